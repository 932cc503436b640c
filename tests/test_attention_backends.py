"""The optional attention backends: flash, flash3, sage, xformers, flex, cudnn.

CPU tests check what can be checked without the libraries or a GPU: imports
stay lazy, ``unavailable_reason`` gives its reasons in the documented order
(device, then architecture, then the library), registration, and flex
against sdpa with the masks the transformer makes. GPU tests (marked ``gpu``)
run each installed kernel on the real problem size against float32 sdpa.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from framepack.backends import AttentionBackend
from framepack.errors import PluginError
from framepack.hardware import HardwareInfo

# module -> (backend name, the library it imports lazily or None, install hint in the reason)
MODULES = {
    "flash": ("flash", "flash_attn", "pip install framepack[flash]"),
    "flash3": ("flash3", "flash_attn_interface", "hopper"),
    "sage": ("sage", "sageattention", "pip install framepack[sage]"),
    "xformers_attn": ("xformers", "xformers", "pip install framepack[xformers]"),
    "flex": ("flex", None, None),
    "cudnn": ("cudnn", None, None),
}
LIBRARIES = ("flash_attn", "flash_attn_interface", "sageattention", "xformers")

CPU = HardwareInfo(device="cpu", ram_total_gb=16, ram_available_gb=16)


def gpu(cc: tuple[int, int], name: str = "test GPU") -> HardwareInfo:
    return HardwareInfo(device="cuda", gpu_name=name, compute_capability=cc, vram_total_gb=24, vram_free_gb=24)


def plugin(module: str):
    return importlib.import_module(f"framepack_plugins.attention.{module}")


def backend_of(module: str) -> AttentionBackend:
    registered: list[AttentionBackend] = []
    plugin(module).framepack_register_attention(register=registered.append)
    assert len(registered) == 1
    return registered[0]


@pytest.fixture
def installed(monkeypatch):
    """Make find_spec report the given libraries as installed (or not)."""
    real = importlib.util.find_spec

    def pretend(present: bool, *names: str) -> None:
        def find_spec(name, package=None):
            if name in names:
                return importlib.machinery.ModuleSpec(name, None) if present else None
            return real(name, package)

        monkeypatch.setattr(importlib.util, "find_spec", find_spec)

    return pretend


# --- imports stay lazy ---------------------------------------------------------


def test_importing_the_plugins_imports_none_of_the_libraries():
    # A fresh interpreter: in this one, earlier tests may have imported anything.
    code = (
        "import importlib, sys\n"
        f"libs = {LIBRARIES!r}\n"
        f"for m in {tuple(MODULES)!r}:\n"
        "    before = {l for l in libs if l in sys.modules}\n"
        "    importlib.import_module('framepack_plugins.attention.' + m)\n"
        "    after = {l for l in libs if l in sys.modules}\n"
        "    print(m, sorted(after - before))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [f"{m} []" for m in MODULES]


# --- registration --------------------------------------------------------------


@pytest.mark.parametrize("module", MODULES)
def test_registers_one_backend_with_its_flags(module):
    backend = backend_of(module)
    name = MODULES[module][0]
    assert backend.name == name and backend.family == "attention"
    assert backend.supports_mask is (name == "flex")
    has_varlen = name in ("flash", "flash3", "sage", "xformers")
    assert (backend.make_varlen_kernel is not None) is has_varlen
    assert (backend.tolerance is not None) is (name == "sage")
    assert isinstance(backend.version(), str)


def test_versions_are_empty_when_the_library_is_missing():
    for module, (name, library, _) in MODULES.items():
        if library is not None and importlib.util.find_spec(library) is None:
            assert backend_of(module).version() == "", name
    assert backend_of("flex").version() == torch.__version__


def test_sage_tolerance_is_loose_but_catches_broken_kernels():
    # Broken kernels (wrong layout or scale) give 0.3 to 1.4; see sage.py.
    assert 0.03 < backend_of("sage").tolerance < 0.2


# --- unavailable_reason: device, then architecture, then library ---------------


@pytest.mark.parametrize("module", ["flash", "flash3", "sage", "xformers_attn", "cudnn"])
def test_needs_cuda_first_even_when_installed(module, installed):
    library = MODULES[module][1]
    if library:
        installed(True, library)
    assert backend_of(module).unavailable_reason(CPU) == "needs CUDA"
    assert backend_of(module).unavailable_reason(HardwareInfo(device="mps")) == "needs CUDA"


@pytest.mark.parametrize("module", ["flash", "sage", "cudnn"])
def test_ampere_kernels_refuse_turing_before_asking_for_the_library(module, installed):
    backend = backend_of(module)
    library = MODULES[module][1]
    if library:
        installed(False, library)
    assert backend.unavailable_reason(gpu((7, 5), "Tesla T4")) == "needs sm80+ (this GPU is sm75)"
    if library:
        installed(True, library)
        assert backend.unavailable_reason(gpu((7, 5))) == "needs sm80+ (this GPU is sm75)"
    assert backend.unavailable_reason(gpu((8, 0))) is None
    assert backend.unavailable_reason(gpu((8, 9))) is None


@pytest.mark.parametrize("cc", [(8, 0), (8, 9), (10, 0), (12, 0)])
def test_flash3_needs_hopper(cc, installed):
    installed(True, "flash_attn_interface")
    reason = backend_of("flash3").unavailable_reason(gpu(cc))
    assert reason == f"needs a Hopper GPU (sm90), this GPU is sm{cc[0]}{cc[1]}"
    assert backend_of("flash3").unavailable_reason(gpu((9, 0), "H100")) is None


@pytest.mark.parametrize("module", ["flash", "flash3", "sage", "xformers_attn"])
def test_not_installed_reason_names_the_library_and_the_fix(module, installed):
    _, library, hint = MODULES[module]
    installed(False, library)
    reason = backend_of(module).unavailable_reason(gpu((9, 0), "H100"))
    assert reason.startswith(f"{library} is not installed (") and hint in reason
    installed(True, library)
    assert backend_of(module).unavailable_reason(gpu((9, 0), "H100")) is None


def test_unknown_compute_capability_is_left_to_the_self_check(installed):
    # Simulated hardware may omit it; refusing would hide a usable kernel.
    installed(True, "flash_attn", "sageattention")
    unknown = HardwareInfo(device="cuda", vram_total_gb=24)
    for module in ("flash", "sage", "cudnn"):
        assert backend_of(module).unavailable_reason(unknown) is None


def test_xformers_has_no_architecture_floor(installed):
    installed(True, "xformers")
    assert backend_of("xformers_attn").unavailable_reason(gpu((7, 5))) is None


def test_flex_runs_on_cpu_and_cuda_not_mps():
    flex = backend_of("flex")
    assert flex.unavailable_reason(CPU) is None
    assert flex.unavailable_reason(gpu((7, 5))) is None
    assert "mps" in flex.unavailable_reason(HardwareInfo(device="mps"))


def test_flex_says_which_torch_it_needs(monkeypatch):
    flex = plugin("flex")
    monkeypatch.setattr(flex, "_has_flex", lambda: False)
    assert flex.unavailable(CPU).startswith("needs torch >= 2.5 (this is torch ")


# --- building kernels without the library --------------------------------------


@pytest.mark.parametrize("module", ["flash", "flash3", "sage", "xformers_attn"])
def test_make_kernel_without_the_library_says_how_to_install(module):
    name, library, hint = MODULES[module]
    if importlib.util.find_spec(library) is not None:
        pytest.skip(f"{library} is installed here")
    backend = backend_of(module)
    for make in (backend.make_kernel, backend.make_varlen_kernel):
        with pytest.raises(PluginError, match=f"attention backend '{name}'") as info:
            make(backend.options())
        assert hint in str(info.value)


def test_cudnn_refuses_float32_and_masks_with_a_hint():
    kernel = backend_of("cudnn").make_kernel(None)
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="needs float16 or bfloat16 inputs, got torch.float32"):
        kernel(q, q, q, None)
    with pytest.raises(ValueError, match="cannot mask"):
        kernel(q.half(), q.half(), q.half(), torch.ones(1, 1, 8, 8, dtype=torch.bool))


# --- flex against sdpa on the CPU ----------------------------------------------


def sdpa(q, k, v, mask):  # (B, L, H, D), float32 reference
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    return t(F.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=mask))


def qkv(b=2, lq=37, lk=37, h=3, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, lq, h, d, generator=g), torch.randn(b, lk, h, d, generator=g), torch.randn(b, lk, h, d, generator=g)


def refiner_mask(lengths: list[int], length: int) -> torch.Tensor:
    """The token refiner's mask, as diffusers builds it: bool (B, 1, L, L) =
    m_i & m_j with column 0 forced True (padding rows attend to key 0 only)."""
    m = torch.arange(length)[None] < torch.tensor(lengths)[:, None]  # (B, L)
    mask = (m[:, None, :, None] & m[:, None, None, :]).clone()
    mask[:, :, :, 0] = True
    return mask


def flex_cases():
    g = torch.Generator().manual_seed(1)
    dense = torch.rand(2, 3, 37, 37, generator=g) > 0.5
    dense[..., 5] = True  # every row keeps a key
    yield "no mask", qkv(), None
    yield "key padding (B, 1, 1, Lk)", qkv(), (torch.arange(37)[None] < torch.tensor([37, 20])[:, None])[:, None, None]
    yield "refiner", qkv(), refiner_mask([30, 9], 37)
    yield "refiner, one sample all padding", qkv(), refiner_mask([37, 0], 37)
    yield "dense per head (B, H, Lq, Lk)", qkv(), dense
    yield "2-D mask (Lq, Lk)", qkv(), dense[0, 0]
    yield "cross attention Lq != Lk", qkv(lq=11, lk=29), torch.rand(11, 29, generator=g) > 0.3


@pytest.mark.parametrize("case, inputs, mask", list(flex_cases()), ids=[c[0] for c in flex_cases()])
def test_flex_matches_sdpa_on_cpu(case, inputs, mask):
    kernel = backend_of("flex").make_kernel(plugin("flex").FlexOptions())  # compile=True: still eager on CPU
    q, k, v = inputs
    out = kernel(q, k, v, mask)
    assert out.shape == q.shape
    torch.testing.assert_close(out, sdpa(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_flex_refiner_padding_rows_are_exactly_value_0():
    q, k, v = qkv()
    out = backend_of("flex").make_kernel(plugin("flex").FlexOptions())(q, k, v, refiner_mask([30, 0], 37))
    torch.testing.assert_close(out[1], v[1, :1].expand_as(out[1]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[0, 30:], v[0, :1].expand_as(out[0, 30:]), rtol=1e-6, atol=1e-6)


def test_flex_eager_path_does_not_warn(recwarn):
    q, k, v = qkv()
    backend_of("flex").make_kernel(plugin("flex").FlexOptions(compile=False))(q, k, v, None)
    assert not [w for w in recwarn if "flex_attention" in str(w.message)]


# --- GPU: each installed kernel on the real problem ----------------------------

# B 1, H 24, D 128, L = 17,500 image tokens + 729 image embedding + 256 text
# (FramePack at 640x608, latent window 9).
REAL = dict(b=1, length=17_500 + 729 + 256, heads=24, dim=128)
# Exact kernels in bf16 land near 3e-3 relative L2 against float32 (bf16
# rounding of P and of the output); lossy kernels state their own tolerance.
EXACT_BF16 = 1e-2


def _gpu_backend(module: str) -> AttentionBackend:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from framepack.hardware import detect_hardware

    backend = backend_of(module)
    reason = backend.unavailable_reason(detect_hardware())
    if reason:
        pytest.skip(f"{backend.name}: {reason}")
    return backend


def _rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm())


@pytest.fixture(scope="module")
def real_problem():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator("cuda").manual_seed(0)
    shape = (REAL["b"], REAL["length"], REAL["heads"], REAL["dim"])
    q, k, v = (torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    # float32 on the same bf16-rounded inputs; the memory-efficient kernel
    # keeps the 18k x 18k scores out of memory (the math one needs 32 GB).
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION), torch.no_grad():
        ref = sdpa(q.float(), k.float(), v.float(), None)
    return q, k, v, ref


@pytest.mark.gpu
@pytest.mark.parametrize("module", ["flash", "flash3", "sage", "xformers_attn", "flex", "cudnn"])
def test_kernel_matches_sdpa_on_the_real_problem(module, real_problem):
    backend = _gpu_backend(module)
    q, k, v, ref = real_problem
    kernel = backend.make_kernel(backend.options())
    with torch.no_grad():
        # Copies: SageAttention 1.0.x smooths the key in place.
        out = kernel(q.clone(), k.clone(), v.clone(), None)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    error = _rel_l2(out, ref)
    limit = backend.tolerance if backend.tolerance is not None else EXACT_BF16
    assert error <= limit, f"{backend.name}: relative L2 error {error:.2e} > {limit:.0e}"


@pytest.mark.gpu
@pytest.mark.parametrize("module", ["flash", "flash3", "sage", "xformers_attn"])
def test_varlen_matches_per_sample_sdpa(module):
    backend = _gpu_backend(module)
    q_lengths, k_lengths = [2000, 1800], [2000, 1300]  # different query and key lengths per sample
    g = torch.Generator("cuda").manual_seed(1)

    def packed(lengths):  # (total, H, D)
        return torch.randn(sum(lengths), REAL["heads"], REAL["dim"], generator=g, device="cuda", dtype=torch.bfloat16)

    def offsets(lengths):  # (B + 1,) int32
        return torch.tensor([0, *lengths], device="cuda").cumsum(0).to(torch.int32)

    q, k, v = packed(q_lengths), packed(k_lengths), packed(k_lengths)
    with torch.no_grad():
        ref = torch.cat([
            sdpa(qs[None].float(), ks[None].float(), vs[None].float(), None)[0]
            for qs, ks, vs in zip(q.split(q_lengths), k.split(k_lengths), v.split(k_lengths))
        ])
        out = backend.make_varlen_kernel(backend.options())(
            q.clone(), k.clone(), v.clone(), offsets(q_lengths), offsets(k_lengths), max(q_lengths), max(k_lengths)
        )
    assert out.shape == q.shape
    error = _rel_l2(out, ref)
    limit = backend.tolerance if backend.tolerance is not None else EXACT_BF16
    assert error <= limit, f"{backend.name} varlen: relative L2 error {error:.2e} > {limit:.0e}"


# --- the benchmark's problem size is the transformer's -------------------------


def test_benchmark_sequence_length_is_what_the_transformer_attends_over(tiny_model):
    """benchmarks/attention_bench.py computes L from the packing; the tiny
    model (same patching and history embedders) must see that many tokens
    at 640x608 with 729 image and 256 text tokens."""
    from pathlib import Path

    from diffusers import HunyuanVideoFramepackTransformer3DModel

    from framepack.attention.processors import install_attention
    from framepack.pipeline.sections import f1_layout

    spec = importlib.util.spec_from_file_location("attention_bench", Path(__file__).parents[1] / "benchmarks" / "attention_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.packed_length() == 17_500 + 729 + 256

    model = HunyuanVideoFramepackTransformer3DModel.from_pretrained(tiny_model, subfolder="transformer").eval()
    seen = []

    def counting_kernel(q, k, v, mask):  # no attention math: only the shapes matter here
        seen.append(q.shape[1])
        return torch.zeros_like(q)

    install_attention(model, counting_kernel)
    width = model.config.text_embed_dim
    h, w = bench.HEIGHT // 8, bench.WIDTH // 8
    layout = f1_layout(bench.WINDOW)
    with torch.no_grad():
        model(
            hidden_states=torch.zeros(1, 16, bench.WINDOW, h, w), timestep=torch.tensor([900.0]),
            encoder_hidden_states=torch.zeros(1, bench.TEXT_TOKENS, width),
            encoder_attention_mask=torch.ones(1, bench.TEXT_TOKENS, dtype=torch.bool),
            pooled_projections=torch.zeros(1, model.config.pooled_projection_dim),
            image_embeds=torch.zeros(1, bench.IMAGE_TOKENS, model.config.image_proj_dim),
            guidance=torch.tensor([10000.0]), indices_latents=layout.latent,
            latents_clean=torch.zeros(1, 16, 2, h, w), indices_latents_clean=layout.clean,
            latents_history_2x=torch.zeros(1, 16, 2, h, w), indices_latents_history_2x=layout.clean_2x,
            latents_history_4x=torch.zeros(1, 16, 16, h, w), indices_latents_history_4x=layout.clean_4x,
            return_dict=False,
        )  # fmt: skip
    assert seen[0] == bench.TEXT_TOKENS  # the token refiner
    assert set(seen[1:]) == {bench.packed_length()}
