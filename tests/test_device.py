"""Device settings (metalm.device): one parser and one error type for the trainer's train.device and the
evaluator's --device, on a machine made to look GPU-less."""
import pytest
import torch

from metalm.device import DeviceError, resolve_device


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.mark.parametrize("setting, shown, use", [("train.device", "train.device=cuda", "use train.device=cpu"),
                                                 ("--device", "--device cuda", "use --device cpu")])
def test_cuda_without_cuda_is_one_error_type_for_both_settings(no_cuda, setting, shown, use):
    with pytest.raises(DeviceError) as e:
        resolve_device("cuda", setting)
    msg = str(e.value)
    assert isinstance(e.value, ValueError) and "\n" not in msg
    if torch.version.cuda is None:
        reason = f"this PyTorch build (torch {torch.__version__}) has no CUDA support"
    else:
        reason = "CUDA_VISIBLE_DEVICES=''"
    assert msg == f"{shown}: no CUDA device is visible ({reason}); {use}, or run where a GPU is visible"


def test_auto_and_cpu_resolve_and_bad_names_are_refused(no_cuda):
    assert resolve_device("auto", "train.device") == "cpu"
    assert resolve_device(" cpu ", "--device") == "cpu"
    for bad in ("gpu", "cpu:0", "cuda:x", ""):
        with pytest.raises(DeviceError, match=f"^--device {bad}: not a device; expected auto, cpu, cuda or cuda:N$"):
            resolve_device(bad, "--device")


def test_a_cuda_index_beyond_the_visible_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1", "--device") == "cuda:1"
    with pytest.raises(DeviceError, match=r"^--device cuda:2: only 2 CUDA devices are visible \(cuda:0 to cuda:1\)$"):
        resolve_device("cuda:2", "--device")
