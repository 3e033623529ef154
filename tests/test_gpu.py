"""CUDA: the device is in the key and outputs land on the input's device. Skipped without a GPU."""

import pytest
import torch

from jitfreeze import jitfreeze

from .models import make

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def entry_key(fast):
    return fast.signatures()[0].key


def test_cuda_output_on_input_device_and_matches(cache_dir, no_jf_warnings):
    model, (x,) = make("cnn")
    model = model.cuda()
    fast = jitfreeze(model, cache_dir=cache_dir)
    with torch.no_grad():
        ref = model(x.cuda())
        out = fast(x.cuda())
        out2 = fast(x.cuda())
    assert out.device.type == "cuda" and out2.device == ref.device
    assert torch.allclose(out2, ref, atol=1e-3, rtol=1e-3)


def test_cpu_and_cuda_have_different_keys(cache_dir, no_jf_warnings):
    cpu_model, (x,) = make("mlp")
    gpu_model, _ = make("mlp")
    gpu_model = gpu_model.cuda()
    f_cpu, f_gpu = jitfreeze(cpu_model, cache_dir=cache_dir), jitfreeze(gpu_model, cache_dir=cache_dir)
    with torch.no_grad():
        assert f_cpu(x).device.type == "cpu"
        assert f_gpu(x.cuda()).device.type == "cuda"
    assert entry_key(f_cpu) != entry_key(f_gpu)
    assert f_gpu.cache_info().compiles == 1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_device_index_is_in_the_key(cache_dir, no_jf_warnings):
    m0, (x,) = make("mlp")
    m1, _ = make("mlp")
    f0, f1 = jitfreeze(m0.to("cuda:0"), cache_dir=cache_dir), jitfreeze(m1.to("cuda:1"), cache_dir=cache_dir)
    with torch.no_grad():
        assert f0(x.to("cuda:0")).device == torch.device("cuda:0")
        assert f1(x.to("cuda:1")).device == torch.device("cuda:1")
    assert entry_key(f0) != entry_key(f1)


def test_half_precision_on_cuda(cache_dir, no_jf_warnings):
    model, (x,) = make("mlp")
    model = model.cuda().half()
    fast = jitfreeze(model, cache_dir=cache_dir)
    with torch.no_grad():
        out = fast(x.cuda().half())
        assert out.dtype == torch.float16
        assert torch.allclose(out, model(x.cuda().half()), atol=1e-2, rtol=1e-2)
