"""Float64 dense masked attention in NumPy: the ground truth every implementation is held to."""

import numpy as np

# Relative-error bounds per dtype for out and lse (gradients get a few times more): float32
# accumulates in float32 everywhere; the half types are rounded at the output.
TOLERANCE = {"float32": 2e-5, "float16": 3e-3, "bfloat16": 2.5e-2}


def random_qkv(rng, batch, time, heads, dim, value_dim=None, dtype="float32"):
    """Fresh standard-normal q, k, v as TF tensors of `dtype`, and the float64 NumPy arrays of
    exactly those (rounded) values, so the reference sees the kernel's inputs."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    shapes = [(batch, time, heads, dim)] * 2 + [(batch, time, heads, value_dim or dim)]
    tensors = [tf.cast(tf.constant(rng.standard_normal(s), tf.float32), dtype) for s in shapes]
    return tensors, [t.numpy().astype(np.float64) for t in tensors]


def attention_reference(q, k, v, mask, scale, d_out=None, d_lse=None):
    """q, k: [B, T, H, D]; v: [B, T, H, Dv]; mask: bool [H or 1, T, T] or [B, H, T, T].

    Returns out [B, T, H, Dv], lse [B, H, T] and, when d_out is given, the gradients
    (dq, dk, dv) of sum(out * d_out) + sum(lse * d_lse)."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    mask = np.asarray(mask, bool)
    if mask.ndim == 3:
        mask = mask[None]
    scores = scale * np.einsum("bihd,bjhd->bhij", q, k)
    scores = np.where(mask, scores, -np.inf)
    peak = scores.max(-1, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    weights = np.where(mask, np.exp(scores - peak), 0.0)
    total = weights.sum(-1, keepdims=True)
    probs = weights / np.where(total > 0, total, 1.0)
    with np.errstate(divide="ignore"):
        lse = np.where(total[..., 0] > 0, np.log(total[..., 0]) + peak[..., 0], -np.inf)
    out = np.einsum("bhij,bjhd->bihd", probs, v)
    if d_out is None:
        return out, lse
    d_out = np.asarray(d_out, np.float64)
    d_lse = np.zeros(lse.shape) if d_lse is None else np.asarray(d_lse, np.float64)
    d_probs = np.einsum("bihd,bjhd->bhij", d_out, v)
    d_scores = probs * (d_probs - (probs * d_probs).sum(-1, keepdims=True) + d_lse[..., None])
    dq = scale * np.einsum("bhij,bjhd->bihd", d_scores, k)
    dk = scale * np.einsum("bhij,bihd->bjhd", d_scores, q)
    dv = np.einsum("bhij,bihd->bjhd", probs, d_out)
    return out, lse, (dq, dk, dv)


def relative_error(actual, expected):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    finite = np.isfinite(expected)
    assert np.array_equal(np.isfinite(actual), finite), "finite entries differ (NaN or inf)"
    denom = np.linalg.norm(expected[finite])
    return np.linalg.norm(actual[finite] - expected[finite]) / max(denom, 1e-30)
