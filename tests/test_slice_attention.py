"""Deformable / full slice attention and the slice transformer (tokens = slices)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medssl.models.slice_attention import DeformableSliceAttention, FullSliceAttention
from medssl.models.slice_transformer import SliceTransformer

DIM = 32
HEADS = 4


def _positions(batch: int, n: int, generator: torch.Generator) -> Tensor:
    """Irregular increasing slice positions in mm, ``[batch, n]``."""
    spacing = 0.5 + 2.5 * torch.rand(batch, n, generator=generator)
    return torch.cumsum(spacing, dim=1) - 40.0


def _randomize_offsets(module: nn.Module, std: float = 0.5) -> None:
    """Give every deformable attention's offset predictor non-zero final weights (zero-initialised by design)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, DeformableSliceAttention):
                m.offset_mlp[-1].weight.normal_(0.0, std)
                m.offset_mlp[-1].bias.normal_(0.0, std)


def _plain_attention(module: nn.Module, x: Tensor, positions: Tensor | None) -> Tensor:
    """softmax(Q K^T / sqrt(d) + B) V per head, looped, from the module's own weights; x is ``[B, N, D]``."""
    assert module.to_q.bias is None and module.to_k.bias is None and module.to_v.bias is None
    heads = module.heads
    dh = x.shape[-1] // heads
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        n = x.shape[1]
        pos = torch.arange(n, dtype=x.dtype) if positions is None else positions[b]
        q_all = x[b] @ module.to_q.weight.T
        k_all = x[b] @ module.to_k.weight.T
        v_all = x[b] @ module.to_v.weight.T
        heads_out = []
        for h in range(heads):
            cols = slice(h * dh, (h + 1) * dh)
            q, k, v = q_all[:, cols], k_all[:, cols], v_all[:, cols]
            delta = pos[:, None] - pos[None, :]  # query minus key, [N, N]
            bias = module.position_bias.mlp((torch.sign(delta) * torch.log1p(delta.abs()))[..., None])[..., h]
            heads_out.append(torch.softmax(q @ k.T / math.sqrt(dh) + bias, dim=-1) @ v)
        out[b] = torch.cat(heads_out, dim=-1) @ module.to_out.weight.T + module.to_out.bias
    return out


@pytest.mark.parametrize("with_positions", [False, True])
def test_zero_offsets_stride_one_equals_plain_multi_head_attention(with_positions):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    attn = DeformableSliceAttention(DIM, heads=HEADS, reference_stride=1, max_offset=2.0, bias_hidden=16).eval()
    with torch.no_grad():  # make the bias matter
        attn.position_bias.mlp[-1].weight.mul_(5.0)
    x = torch.randn(2, 9, DIM, generator=g)
    positions = _positions(2, 9, g) if with_positions else None
    out = attn(x, positions=positions)
    assert torch.count_nonzero(attn.last_offsets) == 0 and attn.last_offsets.shape == (2, 9, HEADS)
    torch.testing.assert_close(out, _plain_attention(attn, x, positions), atol=1e-5, rtol=1e-5)
    full = FullSliceAttention(DIM, heads=HEADS, bias_hidden=16).eval()
    full.load_state_dict({k: v for k, v in attn.state_dict().items() if not k.startswith("offset_mlp")})
    torch.testing.assert_close(full(x, positions=positions), out, atol=1e-5, rtol=1e-5)


def _plain_deformable(module: DeformableSliceAttention, x: Tensor, positions: Tensor | None) -> tuple[Tensor, Tensor]:
    """Looped reference for ONE unpadded volume ``x [N, D]`` -> (offsets ``[M, H]``, output ``[N, D]``)."""
    n, dim = x.shape
    heads, r = module.heads, module.reference_stride
    dh = dim // heads
    pos = torch.arange(n, dtype=x.dtype) if positions is None else positions
    q_all, k_all, v_all = x @ module.to_q.weight.T, x @ module.to_k.weight.T, x @ module.to_v.weight.T
    refs = list(range(0, n, r))
    offsets = torch.stack(
        [torch.tanh(module.offset_mlp(q_all[j : j + r].mean(dim=0))) * module.max_offset for j in refs]
    )  # [M, H]
    heads_out = []
    for h in range(heads):
        cols = slice(h * dh, (h + 1) * dh)
        keys, values, key_pos = [], [], []
        for m, j in enumerate(refs):
            p = min(max(j + offsets[m, h].item(), 0.0), n - 1.0)
            lo = math.floor(p)
            hi = min(lo + 1, n - 1)
            t = p - lo
            keys.append((1 - t) * k_all[lo, cols] + t * k_all[hi, cols])
            values.append((1 - t) * v_all[lo, cols] + t * v_all[hi, cols])
            key_pos.append((1 - t) * pos[lo] + t * pos[hi])
        k, v = torch.stack(keys), torch.stack(values)
        delta = pos[:, None] - torch.stack(key_pos)[None, :]  # query minus sampled key, [N, M]
        bias = module.position_bias.mlp((torch.sign(delta) * torch.log1p(delta.abs()))[..., None])[..., h]
        heads_out.append(torch.softmax(q_all[:, cols] @ k.T / math.sqrt(dh) + bias, dim=-1) @ v)
    return offsets, torch.cat(heads_out, dim=-1) @ module.to_out.weight.T + module.to_out.bias


@pytest.mark.parametrize("with_positions", [False, True])
def test_nonzero_offsets_match_looped_reference(with_positions):
    g = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    attn = DeformableSliceAttention(DIM, heads=HEADS, reference_stride=3, max_offset=2.0, bias_hidden=16).eval()
    _randomize_offsets(attn, std=0.5)
    with torch.no_grad():
        attn.position_bias.mlp[-1].weight.mul_(5.0)
    x = torch.randn(1, 10, DIM, generator=g)  # 4 reference points, the last window holds one slice
    positions = _positions(1, 10, g) if with_positions else None
    out = attn(x, positions=positions)
    with torch.no_grad():
        offsets, expected = _plain_deformable(attn, x[0], None if positions is None else positions[0])
    assert offsets.abs().min() > 1e-2
    torch.testing.assert_close(attn.last_offsets[0], offsets, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=1e-5)


def test_transformer_layers_are_pre_norm():
    g = torch.Generator().manual_seed(8)
    torch.manual_seed(8)
    model = _transformer("deformable", in_dim=20)
    x = torch.randn(2, 8, 20, generator=g)
    positions = _positions(2, 8, g)
    h = model.input_proj(x)
    for layer in model.layers:
        h = h + layer.attention(F.layer_norm(h, (DIM,), layer.norm1.weight, layer.norm1.bias), None, positions)
        h = h + layer.mlp(F.layer_norm(h, (DIM,), layer.norm2.weight, layer.norm2.bias))
    expected = model.norm(h)
    torch.testing.assert_close(model(x, None, positions).tokens, expected)
    torch.testing.assert_close(model.encode_tokens(x, None, positions), expected)


def test_gradients_reach_offset_predictor_and_offsets_stay_bounded():
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    attn = DeformableSliceAttention(DIM, heads=HEADS, reference_stride=2, max_offset=1.5, bias_hidden=16)
    x = torch.randn(2, 12, DIM, generator=g)
    mask = torch.arange(12)[None, :] < torch.tensor([[12], [9]])
    reference = attn(x, mask).detach()
    _randomize_offsets(attn, std=0.3)
    out = attn(x, mask, _positions(2, 12, g))
    assert not torch.allclose(attn(x, mask), reference)  # offsets (and the mm bias) change the output
    out.pow(2).sum().backward()
    for name, p in attn.offset_mlp.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
    offsets = attn.last_offsets
    assert offsets.shape == (2, 6, HEADS) and not offsets.requires_grad
    assert 0.0 < offsets.abs().max() <= 1.5
    _randomize_offsets(attn, std=50.0)  # saturate the tanh
    attn(x, mask)
    assert attn.last_offsets.abs().max() <= 1.5 + 1e-6
    assert attn.last_offsets.abs().max() > 1.4
    assert attn.last_reference_valid.tolist() == [[True] * 6, [True] * 5 + [False]]


def _padded_batch(lengths: list[int], n: int, dim: int, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Tokens and positions with NaN in the padding (never to be read), and the mask."""
    x = torch.randn(len(lengths), n, dim, generator=g)
    positions = _positions(len(lengths), n, g)
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    x[~mask] = float("nan")
    positions[~mask] = float("nan")
    return x, mask, positions


@pytest.mark.parametrize("kind", ["deformable", "full"])
@pytest.mark.parametrize("with_positions", [False, True])
def test_attention_padding_matches_unpadded_volumes(kind, with_positions):
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    if kind == "deformable":
        attn: nn.Module = DeformableSliceAttention(DIM, heads=HEADS, reference_stride=3, max_offset=2.0, bias_hidden=16)
        _randomize_offsets(attn, std=0.5)
    else:
        attn = FullSliceAttention(DIM, heads=HEADS, bias_hidden=16)
    attn.eval()
    x, mask, positions = _padded_batch([7, 12], 12, DIM, g)
    pos = positions if with_positions else None
    out = attn(x, mask, pos)
    assert torch.isfinite(out).all() and torch.count_nonzero(out[0, 7:]) == 0
    if kind == "deformable":
        assert attn.last_offsets[:, :3].abs().min() > 1e-3  # genuinely non-zero, fractional sampling
    for b, length in enumerate([7, 12]):
        alone = attn(x[b : b + 1, :length], None, None if pos is None else pos[b : b + 1, :length])
        torch.testing.assert_close(out[b : b + 1, :length], alone, atol=1e-5, rtol=1e-5)


def _transformer(kind: str, in_dim: int = 24) -> SliceTransformer:
    model = SliceTransformer(in_dim, dim=DIM, depth=2, heads=HEADS, reference_stride=3, attention=kind).eval()
    _randomize_offsets(model, std=0.5)
    return model


@pytest.mark.parametrize("kind", ["deformable", "full"])
def test_transformer_padding_matches_unpadded_volumes(kind):
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = _transformer(kind)
    x, mask, positions = _padded_batch([7, 12], 12, 24, g)
    out = model(x, mask, positions)
    assert out.tokens.shape == (2, 12, DIM) and out.volume.shape == (2, DIM)
    assert torch.isfinite(out.tokens).all() and torch.count_nonzero(out.tokens[0, 7:]) == 0
    for b, length in enumerate([7, 12]):
        alone = model(x[b : b + 1, :length], None, positions[b : b + 1, :length])
        torch.testing.assert_close(out.tokens[b : b + 1, :length], alone.tokens, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.volume[b : b + 1], alone.volume, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["deformable", "full"])
def test_batch_permutation_permutes_outputs(kind):
    g = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    model = _transformer(kind)
    x, mask, positions = _padded_batch([5, 12, 9], 12, 24, g)
    out = model(x, mask, positions)
    perm = torch.tensor([2, 0, 1])
    permuted = model(x[perm], mask[perm], positions[perm])
    torch.testing.assert_close(permuted.tokens, out.tokens[perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(permuted.volume, out.volume[perm], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["deformable", "full"])
def test_volume_embedding_is_normalised_masked_mean(kind):
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    model = _transformer(kind, in_dim=DIM)
    assert isinstance(model.input_proj, nn.Identity)
    lengths = [4, 10, 7]
    x, mask, _ = _padded_batch(lengths, 10, DIM, g)
    out = model(x, mask)
    torch.testing.assert_close(out.volume.norm(dim=1), torch.ones(3))
    for b, length in enumerate(lengths):
        mean = out.tokens[b, :length].mean(dim=0)
        torch.testing.assert_close(out.volume[b], mean / mean.norm(), atol=1e-6, rtol=1e-5)
    unmasked = model(x[1:2])  # mask None: all real
    torch.testing.assert_close(unmasked.volume, F.normalize(unmasked.tokens.mean(dim=1), dim=1))


@pytest.mark.parametrize("kind", ["deformable", "full"])
def test_single_real_slice_and_empty_volume_give_no_nan(kind):
    g = torch.Generator().manual_seed(6)
    torch.manual_seed(6)
    model = _transformer(kind).train()
    x, mask, positions = _padded_batch([1, 12, 0], 12, 24, g)
    out = model(x, mask, positions)
    assert torch.isfinite(out.tokens).all() and torch.isfinite(out.volume).all()
    torch.testing.assert_close(out.volume[:2].norm(dim=1), torch.ones(2))
    assert torch.count_nonzero(out.tokens[0, 1:]) == 0 and torch.count_nonzero(out.volume[2]) == 0
    (out.tokens.sum() + out.volume.sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    alone = model.eval()(x[0:1, :1], None, positions[0:1, :1])
    torch.testing.assert_close(model(x, mask, positions).tokens[0:1, :1], alone.tokens, atol=1e-5, rtol=1e-5)


def test_bad_arguments_raise_value_error_naming_the_argument():
    with pytest.raises(ValueError, match="divisible by heads"):
        DeformableSliceAttention(30, heads=4)
    with pytest.raises(ValueError, match="divisible by heads"):
        FullSliceAttention(30, heads=4)
    with pytest.raises(ValueError, match="reference_stride"):
        DeformableSliceAttention(DIM, heads=HEADS, reference_stride=0)
    with pytest.raises(ValueError, match="max_offset"):
        DeformableSliceAttention(DIM, heads=HEADS, max_offset=-1.0)
    with pytest.raises(ValueError, match="attention"):
        SliceTransformer(8, dim=DIM, heads=HEADS, attention="foo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="depth"):
        SliceTransformer(8, dim=DIM, heads=HEADS, depth=0)
    attn = DeformableSliceAttention(DIM, heads=HEADS)
    with pytest.raises(ValueError, match="mask"):  # padding must be at the end
        attn(torch.randn(1, 4, DIM), torch.tensor([[True, False, True, True]]))
    with pytest.raises(ValueError, match="x must be"):
        attn(torch.randn(1, 4, DIM + 1))
    with pytest.raises(ValueError, match="positions"):
        attn(torch.randn(1, 4, DIM), None, torch.zeros(1, 5))
