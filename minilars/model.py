"""The decoder with an explicit forward and backward, for every model family.

forward(tokens, targets) runs embedding -> n_layers pre-norm blocks -> final RMSNorm
-> head + cross-entropy, putting every cache that backward will need into an
ActivationStore; backward(tape) walks the same steps in reverse and returns a
gradient for every trainable array, by name. Nothing is kept on the model object
between the two calls: all saved state lives in the tape's store.

Block (pre-norm, as LLaMA; the bracketed steps are the architecture description's,
minilars/config.py, each off for LLaMA, which then does no work for them):
    x_0 = E[t] [* embed_scale]
    h = RMSNorm(x);  [q|k|v] = h W_attn_in [+ b_attn_in]
    [q, k = RMSNorm_hd(q), RMSNorm_hd(k)   (qk_norm, per head)]
    q, k = RoPE_i(q), RoPE_i(k)            (layer i's base and scaling: cfg.rope_of_layer)
    a = Attention(q, k, v; window_i, attn_scale) W_attn_out
    x = x + [RMSNorm](a)                   (sandwich_norms: attn_post_norm)
    h = RMSNorm(x);  [g|u] = h W_mlp_in
    m = act(g) * u                         (act: silu, or gelu_tanh for GeGLU)
    x = x + [RMSNorm](m W_mlp_out)         (sandwich_norms: mlp_post_norm)
    logits = [softcap](RMSNorm(x) head^T)
Every RMSNorm scales by (norm_offset + w): 0 for LLaMA, 1 for Gemma.

Letters: B batch, T tokens, N = B*T, d hidden, f MLP width, H/Hkv heads, hd head dim, V vocab.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from .backends import Array, Backend, get_backend
from .config import ModelConfig
from .ops import (AttentionCache, EmbeddingCache, RMSNormCache, attention_backward, attention_forward,
                  attention_options, cross_entropy_backward, cross_entropy_forward, embedding_backward,
                  embedding_forward, geglu_backward, geglu_forward, head_rmsnorm_backward, head_rmsnorm_forward,
                  rmsnorm_backward, rmsnorm_forward, rope_backward, rope_forward, rope_tables, swiglu_backward,
                  swiglu_forward)
from .sites import FrozenSite, LinearSite, dense_weight
from .store import ActivationStore, StoragePlan
from .weights import STREAMS, check_shapes, random_params, stream_outputs

# cfg.activation -> the gated MLP's forward/backward pair (minilars/ops.py)
GATES = {"silu": (swiglu_forward, swiglu_backward), "gelu_tanh": (geglu_forward, geglu_backward)}


@dataclass
class BlockInput:
    x: Array  # (N, d) residual stream entering the block (kept under `recompute`)


@dataclass
class AttentionOutput:
    """Kept under `recompute` when the plan names attn.o (StoragePlan.keeps_attention_output):
    with them backward rebuilds the attention cache from recomputed q, k, v without
    running the attention forward again."""

    o: Array  # (B, T, H, hd) attention output
    lse: Array  # (B, T, H) log-sum-exp of each score row


@dataclass
class Tape:
    """What forward hands to backward."""

    loss: float
    n_labelled: int  # tokens whose target is not ignore_index
    store: ActivationStore
    batch: int  # B
    seq_len: int  # T


@dataclass
class KVCache:
    """Keys and values of the tokens seen so far, for generation: k, v per block
    (B, T_max, Hkv, hd), filled up to `length`."""

    k: list
    v: list
    length: int = 0


class Model:
    """A decoder whose linear streams are LinearSites (frozen, full, or an adapter)."""

    def __init__(self, cfg: ModelConfig, params: dict[str, np.ndarray], backend: str | Backend | None = "numpy",
                 compute_dtype: str = "float32", attention_tile: int = 256, loss_chunk: int = 256,
                 mlp_chunk: int = 512, plan: StoragePlan | None = None):
        check_shapes(cfg, params)
        self.cfg = cfg
        self.be = get_backend(backend)
        self.compute_dtype = self.be.dtype(compute_dtype)
        self.attention_tile = attention_tile
        self.loss_chunk = loss_chunk
        if mlp_chunk < 1:
            raise ValueError(f"mlp_chunk must be >= 1 token, got {mlp_chunk}")
        self.mlp_chunk = mlp_chunk  # tokens per MLP pass when the MLP keeps nothing for the whole block
        self.plan = plan or StoragePlan()
        self.bases: dict[str, Array] = {}  # calibrated storage bases, see store.py
        self.params: dict[str, Array] = {name: self.be.asarray(array) for name, array in params.items()}
        outputs = stream_outputs(cfg)
        self.sites: list[dict[str, LinearSite]] = [
            {stream: FrozenSite(self.params[f"blocks.{i}.{stream}.weight"], outputs[stream],
                                self.params.get(f"blocks.{i}.{stream}.bias")) for stream in STREAMS}
            for i in range(cfg.n_layers)]
        self.train_embeddings = False
        self.train_norms = False
        self._gate_forward, self._gate_backward = GATES[cfg.activation]
        self._rope_cache: dict[tuple, tuple[int, Array, Array]] = {}  # (theta, scaling) -> (n, cos, sin)
        self.method = None  # the MethodConfig applied, see minilars/methods/

    @classmethod
    def random(cls, cfg: ModelConfig, seed: int = 0, dtype=np.float32, **kwargs) -> "Model":
        kwargs.setdefault("compute_dtype", np.dtype(dtype).name)
        return cls(cfg, random_params(cfg, seed, dtype), **kwargs)

    # ---------------------------------------------------------------- parameters
    @property
    def head(self) -> Array:
        return self.params["embed.weight" if self.cfg.tie_embeddings else "head.weight"]

    def trainable(self) -> dict[str, Array]:
        """Every trainable array by name; the optimizer updates them in place."""
        out: dict[str, Array] = {}
        if self.train_embeddings:
            out["embed.weight"] = self.params["embed.weight"]
            if not self.cfg.tie_embeddings:
                out["head.weight"] = self.params["head.weight"]
        if self.train_norms:
            out.update({name: p for name, p in self.params.items() if name.endswith("norm.weight")})
        for i, block in enumerate(self.sites):
            for stream, site in block.items():
                for local, array in site.trainable().items():
                    out[f"blocks.{i}.{stream}.{local}"] = array
        return out

    def n_trainable(self) -> int:
        return int(sum(int(np.prod(a.shape)) for a in self.trainable().values()))

    def n_params(self) -> int:
        return int(sum(int(np.prod(a.shape)) for a in self.params.values()))

    def merged_params(self) -> dict[str, np.ndarray]:
        """Engine parameters with every adapter folded into its weight (numpy)."""
        out = {name: self.be.to_numpy(dense_weight(p, self.be)) for name, p in self.params.items()}
        for i, block in enumerate(self.sites):
            for stream, site in block.items():
                out[f"blocks.{i}.{stream}.weight"] = self.be.to_numpy(site.to_linear(self.be))
                if site.bias is not None:
                    out[f"blocks.{i}.{stream}.bias"] = self.be.to_numpy(site.merged_bias(self.be))
        return out

    # ---------------------------------------------------------------- forward
    def _rope(self, positions: int, layer: int) -> tuple[Array, Array]:
        """cos, sin (n, hd), n >= positions, of layer's RoPE (cfg.rope_of_layer): one
        pair of float64 tables per (theta, scaling), shared by the layers that use it."""
        key = self.cfg.rope_of_layer(layer)
        cached = self._rope_cache.get(key)
        if cached is None or cached[0] < positions:
            n = max(positions, min(self.cfg.max_seq_len, 4096))
            theta, scaling = key
            cos, sin = rope_tables(n, self.cfg.head_dim, theta, np.float64, scaling)
            cached = self._rope_cache[key] = (n, self.be.asarray(cos), self.be.asarray(sin))
        return cached[1], cached[2]

    def _norm(self, x: Array, name: str) -> tuple[Array, RMSNormCache]:
        """RMSNorm of x (rows, d) by parameter `name`, scaled by (norm_offset + w)."""
        return rmsnorm_forward(x, self.params[name], self.cfg.rms_eps, self.be, self.cfg.norm_offset)

    def _norm_backward(self, dy: Array, cache: RMSNormCache, name: str, grads: dict) -> Array:
        """dx of _norm; dw adds into grads[name] when the norms train."""
        dx, dw = rmsnorm_backward(dy, cache, self.params[name], self.be, self.cfg.norm_offset)
        if self.train_norms:
            _accumulate(grads, name, dw)
        return dx

    def _head_norm(self, x: Array, name: str) -> tuple[Array, RMSNormCache]:
        """q/k norm: RMSNorm over each head's hd, x (B, T, heads, hd)."""
        return head_rmsnorm_forward(x, self.params[name], self.cfg.rms_eps, self.be, self.cfg.norm_offset)

    def _head_norm_backward(self, dy: Array, cache: RMSNormCache, name: str, grads: dict) -> Array:
        dx, dw = head_rmsnorm_backward(dy, cache, self.params[name], self.be, self.cfg.norm_offset)
        if self.train_norms:
            _accumulate(grads, name, dw)
        return dx

    def _check_tokens(self, tokens) -> tuple[int, int]:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (batch, seq_len), got shape {tuple(tokens.shape)}")
        batch, seq_len = tokens.shape
        if seq_len > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {seq_len} tokens is longer than the model's context "
                             f"({self.cfg.max_seq_len})")
        return batch, seq_len

    def _embed(self, tokens: Array) -> tuple[Array, EmbeddingCache]:
        x, cache = embedding_forward(self.params["embed.weight"], tokens.reshape(-1), self.be, self.cfg.embed_scale)
        return self.be.cast(x, self.compute_dtype), cache

    def forward(self, tokens, targets, store: ActivationStore | None = None, need_grad: bool = True,
                ignore_index: int = -100) -> Tape:
        """Loss of next-token prediction. tokens, targets (B, T) int; targets are
        already shifted (targets[b, t] is the label for position t)."""
        be, cfg = self.be, self.cfg
        batch, seq_len = self._check_tokens(tokens)
        tokens, targets = be.asarray(tokens, "int64"), be.asarray(targets, "int64")
        if store is None:
            store = ActivationStore(be, self.plan, self.bases)
        store.n_tokens = batch * seq_len
        keep = store.keep if need_grad else None
        x, cache = self._embed(tokens)
        if need_grad and self.train_embeddings:
            store.keep("embed", cache)
        for i in range(cfg.n_layers):
            with self._merged_block(i):
                if keep is not None and self.plan.recompute_blocks:
                    store.keep(f"blocks.{i}.input", BlockInput(x))
                    on_attention = None
                    if self.plan.keeps_attention_output:
                        site = f"blocks.{i}.attn"
                        on_attention = lambda o, lse, site=site: store.keep(site, AttentionOutput(o, lse))  # noqa: E731
                    x = self._block_forward(i, x, batch, seq_len, None, on_attention=on_attention)
                else:
                    x = self._block_forward(i, x, batch, seq_len, keep)
        h, cache = self._norm(x, "final_norm.weight")
        if keep is not None:
            store.keep("final_norm", cache)
        train_head = self.train_embeddings
        loss, n_labelled, cache = cross_entropy_forward(
            h, self.head, targets.reshape(-1), be, chunk=self.loss_chunk, ignore_index=ignore_index,
            need_dx=need_grad, need_dhead=need_grad and train_head, softcap=cfg.final_softcap)
        if keep is not None:
            store.keep("head", cache)
        return Tape(loss, n_labelled, store, batch, seq_len)

    @contextmanager
    def _merged_block(self, i: int):
        """Block i's sites that can fold their adapter into one effective weight (LARS:
        W + P M) hold it while the block runs, and drop it after: one block's weights
        at a time, however long the sequence (minilars/adapters.py: LARSSite.merge)."""
        merging = [site for site in self.sites[i].values() if hasattr(site, "merge")]
        for site in merging:
            site.merge(self.be)
        try:
            yield
        finally:
            for site in merging:
                site.unmerge()

    def _block_forward(self, i: int, x: Array, batch: int, seq_len: int, keep, kv: KVCache | None = None,
                       on_attention=None) -> Array:
        """One pre-norm block; keep(site, cache) receives every cache (None: keep nothing).
        With nothing kept the MLP runs mlp_chunk tokens at a time (_mlp_chunked).
        on_attention(o, lse), if given, receives the attention kernel's outputs."""
        x = self._attention_half(i, x, batch, seq_len, keep, kv, on_attention=on_attention)
        if keep is None:
            return self._mlp_chunked(i, x, lambda rows, x_rows: self._mlp_half(i, x_rows, None))
        return self._mlp_half(i, x, keep)

    def _attention_half(self, i: int, x: Array, batch: int, seq_len: int, keep, kv: KVCache | None = None,
                        on_attention=None, attention_output: AttentionOutput | None = None) -> Array:
        """x + [post-norm](Attention(RoPE([norm](RMSNorm(x) W_attn_in + b))) W_attn_out):
        (N, d) -> (N, d). attention_output (a recomputed block whose forward kept it): O
        and lse come from there instead of from the attention kernel, whose cache is
        rebuilt from the recomputed q, k, v. on_attention(o, lse) receives the kernel's
        outputs."""
        be, cfg, sites = self.be, self.cfg, self.sites[i]
        pre = f"blocks.{i}."
        n = batch * seq_len
        run = _site_runner(keep, be)
        keep = keep or (lambda site, cache: None)

        h, cache = self._norm(x, pre + "attn_norm.weight")  # (N, d)
        keep(pre + "attn_norm", cache)
        qkv, cache = run(sites["attn_in"], h)  # (N, H*hd + 2k)
        if cache is not None:
            keep(pre + "attn_in", cache)
        dq, dk = cfg.q_dim, cfg.kv_dim
        q = qkv[:, :dq].reshape(batch, seq_len, cfg.n_heads, cfg.head_dim)
        k = qkv[:, dq:dq + dk].reshape(batch, seq_len, cfg.n_kv_heads, cfg.head_dim)
        v = qkv[:, dq + dk:].reshape(batch, seq_len, cfg.n_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, cache = self._head_norm(q, pre + "q_norm.weight")  # (B, T, H, hd)
            keep(pre + "q_norm", cache)
            k, cache = self._head_norm(k, pre + "k_norm.weight")  # (B, T, Hkv, hd)
            keep(pre + "k_norm", cache)
        start = kv.length if kv is not None else 0
        cos, sin = self._rope(start + seq_len, i)
        cos_t, sin_t = cos[start:start + seq_len], sin[start:start + seq_len]
        q = rope_forward(q, cos_t, sin_t, be)  # (B, T, H, hd)
        k = rope_forward(k, cos_t, sin_t, be)  # (B, T, Hkv, hd)
        window, scale = cfg.window(i), cfg.attn_scale
        if attention_output is not None:  # O = softmax(Q K^T) V as the forward computed it
            o = attention_output.o
            keep(pre + "attn", AttentionCache(q, k, v, o, attention_output.lse))
        elif kv is None:
            o, cache = attention_forward(q, k, v, self.attention_tile, be, window, scale)  # (B, T, H, hd)
            keep(pre + "attn", cache)
            if on_attention is not None:
                on_attention(o, cache.lse)
        else:
            kv.k[i][:, start:start + seq_len] = k
            kv.v[i][:, start:start + seq_len] = v
            o, _ = be.attention_forward(q, kv.k[i][:, :start + seq_len], kv.v[i][:, :start + seq_len],
                                        self.attention_tile, q_offset=start, **attention_options(window, scale))
        a, cache = run(sites["attn_out"], o.reshape(n, dq))  # (N, d)
        if cache is not None:
            keep(pre + "attn_out", cache)
        if cfg.sandwich_norms:
            a, cache = self._norm(a, pre + "attn_post_norm.weight")
            keep(pre + "attn_post_norm", cache)
        return x + a

    def _mlp_half(self, i: int, x: Array, keep, need_output: bool = True) -> Array | None:
        """x + [post-norm](act(g) * u W_mlp_out), [g|u] = RMSNorm(x) W_mlp_in:
        (rows, d) -> (rows, d). Every op is row-wise, so any slice of tokens can go
        through it alone. need_output=False (recompute in backward) keeps the caches
        but skips the down projection's frozen product, which backward never reads
        (2 rows f d FLOPs saved), unless a post-norm reads it."""
        be, cfg, sites = self.be, self.cfg, self.sites[i]
        pre = f"blocks.{i}."
        run = _site_runner(keep, be)
        keep = keep or (lambda site, cache: None)
        h, cache = self._norm(x, pre + "mlp_norm.weight")
        keep(pre + "mlp_norm", cache)
        gate_up, cache = run(sites["mlp_in"], h)  # (rows, 2f)
        if cache is not None:
            keep(pre + "mlp_in", cache)
        m, cache = self._gate_forward(gate_up, be)  # (rows, f)
        keep(pre + "mlp", cache)
        if need_output or cfg.sandwich_norms:
            down, cache = run(sites["mlp_out"], m)  # (rows, d)
        else:
            down, cache = None, sites["mlp_out"].backward_cache(m, be)
        if cache is not None:
            keep(pre + "mlp_out", cache)
        if cfg.sandwich_norms:
            down, cache = self._norm(down, pre + "mlp_post_norm.weight")
            keep(pre + "mlp_post_norm", cache)
        return x + down if need_output else None

    def _mlp_chunked(self, i: int, x: Array, run) -> Array:
        """out[rows] = run(rows, x[rows]) for consecutive slices of mlp_chunk tokens, so
        the MLP's (rows, 2f) work arrays stay the same size whatever T is. (N, d) -> (N, d)."""
        n = x.shape[0]
        if n <= self.mlp_chunk:
            return run(slice(0, n), x)
        out = self.be.zeros_like(x)
        for r0 in range(0, n, self.mlp_chunk):
            rows = slice(r0, min(r0 + self.mlp_chunk, n))
            out[rows] = run(rows, x[rows])
        return out

    # ---------------------------------------------------------------- backward
    def backward(self, tape: Tape, dloss: float = 1.0) -> dict[str, Array]:
        """Gradient of dloss * loss for every array in trainable(), by name."""
        be, cfg, store = self.be, self.cfg, tape.store
        grads: dict[str, Array] = {}
        dh, dhead = cross_entropy_backward(dloss, store.take("head"), be)  # (N, d), (V, d)
        dx = self._norm_backward(dh, store.take("final_norm"), "final_norm.weight", grads)
        for i in reversed(range(cfg.n_layers)):
            with self._merged_block(i):
                dx = self._block_backward(i, dx, tape.batch, tape.seq_len, store, grads,
                                          need_dx=i > 0 or self.train_embeddings)
        if self.train_embeddings:
            dembed = embedding_backward(dx, store.take("embed"), cfg.vocab_size, be, cfg.embed_scale)
            if cfg.tie_embeddings:
                dembed += dhead  # the head reads E unscaled
            else:
                grads["head.weight"] = dhead
            grads["embed.weight"] = dembed
        return grads

    def _block_backward(self, i: int, dx: Array, batch: int, seq_len: int, store: ActivationStore, grads: dict,
                        need_dx: bool = True) -> Array | None:
        be, cfg = self.be, self.cfg
        pre = f"blocks.{i}."
        n = batch * seq_len

        if self.plan.recompute_blocks:
            # Rerun the forward to refill this block's caches: the attention half whole
            # (its backward needs every token), the MLP half mlp_chunk tokens at a time,
            # each slice's backward right after its forward, so only one slice's MLP
            # caches and work arrays are ever alive.
            x_in = store.take(pre + "input").x
            kept = store.take(pre + "attn") if self.plan.keeps_attention_output else None
            x1 = self._attention_half(i, x_in, batch, seq_len, store.keep, attention_output=kept)
            del kept
            del x_in

            def mlp_rows(rows: slice, x_rows: Array) -> Array:
                with store.token_rows(x_rows.shape[0]):
                    self._mlp_half(i, x_rows, store.keep, need_output=False)
                return self._mlp_backward(i, dx[rows], store, grads)

            dx = self._mlp_chunked(i, x1, mlp_rows)
            del x1
        else:
            dx = self._mlp_backward(i, dx, store, grads)

        da = dx
        if cfg.sandwich_norms:
            da = self._norm_backward(dx, store.take(pre + "attn_post_norm"), pre + "attn_post_norm.weight", grads)
        do = self._site_backward(i, "attn_out", da, store, grads)  # (N, H*hd)
        del da
        do = do.reshape(batch, seq_len, cfg.n_heads, cfg.head_dim)
        dq, dk, dv = attention_backward(do, store.take(pre + "attn"), self.attention_tile, be, cfg.window(i),
                                        cfg.attn_scale)
        del do
        cos, sin = self._rope(seq_len, i)
        dq = rope_backward(dq, cos[:seq_len], sin[:seq_len], be)
        dk = rope_backward(dk, cos[:seq_len], sin[:seq_len], be)
        if cfg.qk_norm:
            dq = self._head_norm_backward(dq, store.take(pre + "q_norm"), pre + "q_norm.weight", grads)
            dk = self._head_norm_backward(dk, store.take(pre + "k_norm"), pre + "k_norm.weight", grads)
        dqkv = be.concat([dq.reshape(n, cfg.q_dim), dk.reshape(n, cfg.kv_dim), dv.reshape(n, cfg.kv_dim)], axis=1)
        del dq, dk, dv
        if not (need_dx or self.train_norms):  # the first block: only its weights' gradients are wanted
            self._site_backward(i, "attn_in", dqkv, store, grads, need_dx=False)  # no dh = dqkv W^T
            store.drop(pre + "attn_norm")
            return None
        dh = self._site_backward(i, "attn_in", dqkv, store, grads)  # (N, d)
        del dqkv
        dxn = self._norm_backward(dh, store.take(pre + "attn_norm"), pre + "attn_norm.weight", grads)
        return dx + dxn if need_dx else None

    def _mlp_backward(self, i: int, dx: Array, store: ActivationStore, grads: dict) -> Array:
        """dx + d(MLP half)/dx for the rows the MLP caches hold: (rows, d) -> (rows, d).
        Weight gradients add up across calls (one call per slice of tokens)."""
        be, cfg = self.be, self.cfg
        pre = f"blocks.{i}."
        ddown = dx
        if cfg.sandwich_norms:
            ddown = self._norm_backward(dx, store.take(pre + "mlp_post_norm"), pre + "mlp_post_norm.weight", grads)
        dm = self._site_backward(i, "mlp_out", ddown, store, grads)  # (rows, f)
        del ddown
        dgate_up = self._gate_backward(dm, store.take(pre + "mlp"), be)  # (rows, 2f)
        del dm
        dh = self._site_backward(i, "mlp_in", dgate_up, store, grads)  # (rows, d)
        del dgate_up
        dxn = self._norm_backward(dh, store.take(pre + "mlp_norm"), pre + "mlp_norm.weight", grads)
        return dx + dxn

    def _site_backward(self, i: int, stream: str, dy: Array, store: ActivationStore, grads: dict,
                       need_dx: bool = True) -> Array | None:
        """A linear site's backward from its kept cache; its weight gradients add into grads."""
        pre = f"blocks.{i}."
        cache = store.take(pre + stream) if pre + stream in store else None
        d_in, site_grads = self.sites[i][stream].backward(dy, cache, self.be, need_dx=need_dx)
        for local, g in site_grads.items():
            _accumulate(grads, f"{pre}{stream}.{local}", g)
        return d_in

    # ---------------------------------------------------------------- inference
    def hidden(self, tokens, kv: KVCache | None = None) -> Array:
        """Final-normed hidden states (B, T, d) without keeping anything; with a KV
        cache the tokens continue the cached sequence and extend it."""
        be, cfg = self.be, self.cfg
        batch, seq_len = self._check_tokens(tokens)
        start = kv.length if kv is not None else 0
        if start + seq_len > cfg.max_seq_len:
            raise ValueError(f"{start + seq_len} tokens exceed the model's context ({cfg.max_seq_len})")
        x, _ = self._embed(be.asarray(tokens, "int64"))
        for i in range(cfg.n_layers):
            x = self._block_forward(i, x, batch, seq_len, None, kv)
        if kv is not None:
            kv.length += seq_len
        h, _ = self._norm(x, "final_norm.weight")
        return h.reshape(batch, seq_len, cfg.dim)

    def logits(self, tokens, kv: KVCache | None = None, last_only: bool = False) -> Array:
        """(B, T, V) logits, or (B, V) for the last position only; soft-capped,
        c tanh(z / c), when the model has a final_softcap c."""
        h = self.hidden(tokens, kv)
        if last_only:
            h = h[:, -1:]
        batch, seq_len = h.shape[0], h.shape[1]
        out = self.head_logits(h.reshape(batch * seq_len, self.cfg.dim))
        return out.reshape(batch, self.cfg.vocab_size) if last_only else out.reshape(batch, seq_len, -1)

    def head_logits(self, h: Array) -> Array:
        """(N, d) final-normed hidden states -> (N, V) logits h E^T, soft-capped when
        the model has a final_softcap."""
        out = self.be.matmul_nt(h, self.head)
        return out if self.cfg.final_softcap is None else self.be.softcap(out, self.cfg.final_softcap)

    def loss_of_hidden(self, h: Array, targets, ignore_index: int = -100) -> tuple[float, int]:
        """(mean loss, labelled count) of final-normed hidden states h (N, d) against
        targets (N,), forward only: the head and loss of `forward` without its blocks."""
        loss, n_labelled, _ = cross_entropy_forward(
            h, self.head, self.be.asarray(targets, "int64"), self.be, chunk=self.loss_chunk,
            ignore_index=ignore_index, need_dx=False, softcap=self.cfg.final_softcap)
        return loss, n_labelled

    def new_kv_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        cfg, be = self.cfg, self.be
        max_len = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
        shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
        return KVCache([be.zeros(shape, self.compute_dtype) for _ in range(cfg.n_layers)],
                       [be.zeros(shape, self.compute_dtype) for _ in range(cfg.n_layers)])


def _site_runner(keep, be: Backend):
    """site, x -> (y, cache): the site's forward when caches are kept, else its apply
    (y alone, skipping work only the cache needs, e.g. LARS's z = x P). An object that
    stands in for a site with a forward alone (a wrapper recording inputs, say) runs
    its forward either way."""
    if keep is None:
        return lambda site, x: (site.apply(x, be) if hasattr(site, "apply") else site.forward(x, be)[0], None)
    return lambda site, x: site.forward(x, be)


def _accumulate(grads: dict, name: str, g: Array) -> None:
    """grads[name] = g, or the sum with what an earlier slice of tokens gave."""
    grads[name] = g if name not in grads else grads[name] + g
