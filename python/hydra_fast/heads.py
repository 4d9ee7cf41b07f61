"""Draft heads (Medusa, Hydra, Hydra++) for a stock HF causal LM, and their checkpoints.

A head reads the base model's last hidden state h (the one the base LM head reads) and, for Hydra, the input
embeddings of the tokens on its tree path; it outputs a state that an LM head (the base's frozen one, or its
own) turns into logits. Head i drafts tree depth i + 1. The kinds differ only in the table ``KINDS``:
Medusa heads see no path tokens, Hydra head i sees i + 1 (the root token, i.e. the base model's next token,
plus the i tokens drafted before it), Hydra++ adds a prefix layer (one decoder layer of the base
architecture over the base hidden states, whose output feeds the heads) and 4-layer heads.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os

import torch
import torch.nn.functional as F
from torch import nn

from hydra_fast import reference
from hydra_fast.draft_vocab import DRAFT_VOCAB_NAME, DraftVocab, DraftVocabFile
from hydra_fast.heads_config import (KINDS, BaseFingerprint, HeadKind, HeadsCheckpointError, HeadsConfig,
                                     HeadsMismatchError, _dtype_name, check_compatible, fingerprint)
from hydra_fast.heads_io import CONFIG_NAME, INDEX_NAME, check_heads_folder, is_weights_file, read_weights
from hydra_fast.matmul import lm_head_logits
from hydra_fast.ops import row_topk
from hydra_fast.tree import TreeBuffers

__all__ = ["BaseFingerprint", "DraftHead", "DraftHeads", "HeadKind", "HeadsCheckpointError", "HeadsConfig",
           "HeadsMismatchError", "KINDS", "check_compatible", "fingerprint", "zero_residual_branches_"]


class DraftHead(nn.Module):
    """One head: blocks x <- res(x) + silu(W x + b) over x = [h, emb(path tokens)], k path tokens."""

    def __init__(self, hidden_size: int, vocab_size: int, path_len: int, num_layers: int, own_lm_head: bool):
        super().__init__()
        d, fan_in = hidden_size, (path_len + 1) * hidden_size
        self.path_len = path_len
        self.blocks = nn.ModuleList(nn.Linear(fan_in if i == 0 else d, d) for i in range(num_layers))
        self.res = nn.Linear(fan_in, d) if path_len > 0 else None
        self.lm_head = nn.Linear(d, vocab_size, bias=False) if own_lm_head else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Untrained head = identity on h: silu(0 x + 0) = 0 adds nothing and res = [I | 0] passes h on."""
        for block in self.blocks:
            block.weight.zero_()
            block.bias.zero_()
        if self.res is not None:
            d = self.res.out_features
            self.res.weight.zero_()
            self.res.weight[:, :d].copy_(torch.eye(d))
            self.res.bias.zero_()

    def forward(self, hidden, path_tokens, embed_weight, impl) -> torch.Tensor:
        """hidden [R, d], path_tokens int64 [R, k], embed_weight [V, d] -> [R, d]."""
        res_w = self.res.weight if self.res is not None else None
        res_b = self.res.bias if self.res is not None else None
        return impl.draft_head_mlp(hidden, path_tokens, embed_weight, [b.weight for b in self.blocks],
                                   [b.bias for b in self.blocks], res_w, res_b)


class DraftHeads(nn.Module):
    """All heads of one model, plus the Hydra++ prefix layer (None for the other kinds).

    ``base_config``: the live base model's transformers config. The prefix layer is built with it, so
    switching the base's attention implementation also switches the prefix layer's; without it the layer is
    built from ``config.base_config`` with SDPA attention.
    """

    def __init__(self, config: HeadsConfig, base_config=None):
        super().__init__()
        self.config = config
        kind = KINDS[config.kind]
        self.heads = nn.ModuleList(
            DraftHead(config.hidden_size, config.vocab_size, i + 1 if kind.path_tokens else 0, config.num_layers,
                      config.own_lm_head)
            for i in range(config.num_heads))
        self.prefix_layer = None
        self.draft_vocab: DraftVocab | None = None  # None: the draft reads the full LM heads
        self.draft_vocab_file: DraftVocabFile | None = None  # the heads folder's token order, when loaded
        if kind.prefix_layer:
            if base_config is None:
                base_config = _config_from_dict(config.base_config)
            self.prefix_layer = _decoder_layer_class(base_config)(base_config, layer_idx=0)

    @classmethod
    def from_base(cls, base_model: nn.Module, kind: str, num_heads: int = 4, num_layers: int | None = None,
                  own_lm_head: bool = False, prefix_init: str = "identity") -> DraftHeads:
        """Untrained heads on the base's device and dtype: each reproduces the base LM head's prediction.

        The Hydra++ prefix layer starts as a copy of the base's last decoder layer; with ``prefix_init``
        "identity" (default) its attention and MLP output projections are zeroed so it passes its input
        through unchanged (that layer was trained on un-normalised inputs; fed the final normed hidden
        states, a plain copy scrambles them); "copy" keeps the copy as is."""
        if prefix_init not in ("identity", "copy"):
            raise ValueError(f"prefix_init must be 'identity' or 'copy', got {prefix_init!r}")
        lm_head = base_model.get_output_embeddings()
        fp = fingerprint(base_model)
        config = HeadsConfig(kind=kind, hidden_size=fp.hidden_size, vocab_size=fp.vocab_size, base=fp,
                             num_heads=num_heads, num_layers=num_layers, own_lm_head=own_lm_head,
                             base_config=json.loads(base_model.config.to_json_string(use_diff=False)),
                             dtype=_dtype_name(lm_head.weight.dtype))
        heads = cls(config, base_model.config)
        with torch.no_grad():
            for head in heads.heads:
                if head.lm_head is not None:
                    head.lm_head.weight.copy_(lm_head.weight)
            if heads.prefix_layer is not None:
                heads.prefix_layer.load_state_dict(_decoder_layers(base_model)[-1].state_dict())
                if prefix_init == "identity" and zero_residual_branches_(heads.prefix_layer) != 2:
                    raise ValueError(f"{type(heads.prefix_layer).__name__} does not have exactly one o_proj and "
                                     "one down_proj: pass prefix_init='copy'")
        return heads.to(device=lm_head.weight.device, dtype=lm_head.weight.dtype)

    def logits(self, i: int, x: torch.Tensor, base_lm_head) -> torch.Tensor:
        """Head i's output state x [R, d] -> logits [R, V], through its own LM head or the base's."""
        lm_head = self.heads[i].lm_head
        return lm_head_logits(lm_head if lm_head is not None else base_lm_head, x)

    def draft(self, hidden, root, bufs: TreeBuffers, embed_weight, base_lm_head, impl) -> torch.Tensor:
        """Candidate tokens of every tree node. hidden [B, d] (Hydra++: the prefix layer's output), root
        int64 [B] (the base model's next token), embed_weight [V, d]. -> int64 [B, N], column 0 = root.

        Static shapes, no host reads: runs under torch.compile(fullgraph=True) and CUDA-graph capture."""
        if len(bufs.levels) > len(self.heads):
            raise ValueError(f"the tree is {len(bufs.levels)} deep but there are only {len(self.heads)} heads")
        B, dm = hidden.shape
        candidates = root.new_zeros(B, bufs.num_nodes)  # [B, N]
        candidates[:, 0] = root
        guesses = self._pathless_guesses(bufs.levels, hidden, root, embed_weight, base_lm_head, impl)
        for level in bufs.levels:
            i = level.depth - 1
            head = self.heads[i]
            if head.path_len == 0:
                # one guess list per sequence, shared by all parents of the level
                child = guesses[level.depth][:, level.child_rank]  # [B, Cd]
            else:
                Pd = level.parent_nodes.shape[0]
                path = candidates[:, level.parent_paths].reshape(B * Pd, level.depth)  # [B*Pd, d] root..parent
                h = hidden.unsqueeze(1).expand(B, Pd, dm).reshape(B * Pd, dm)  # [B*Pd, dm]
                x = head(h, path, embed_weight, impl)  # [B*Pd, dm]
                ids = self._draft_topk(i, x, base_lm_head, level.topk, impl)
                ids = ids.view(B, Pd, level.topk)  # [B, Pd, topk]
                child = ids[:, level.child_slot, level.child_rank]  # [B, Cd]
            candidates[:, level.child_nodes] = child
        return candidates

    def _pathless_guesses(self, levels, hidden, root, embed_weight, base_lm_head, impl) -> dict[int, torch.Tensor]:
        """{depth: token ids [B, topk]} of the levels whose head reads no path (Medusa's heads). Their states do not
        depend on each other, so when they share the LM head (the base's, or the draft vocabulary's compact one)
        they are stacked into one product, which reads the LM head once for all levels, and one top-k with the
        largest k of them; each level keeps its first topk columns (the top-k of a descending top-K)."""
        flat = [level for level in levels if self.heads[level.depth - 1].path_len == 0]
        B = hidden.shape[0]
        states = [self.heads[level.depth - 1](hidden, root.new_zeros(B, 0), embed_weight, impl) for level in flat]
        if len(flat) < 2 or any(self.heads[level.depth - 1].lm_head is not None for level in flat):
            return {level.depth: self._draft_topk(level.depth - 1, x, base_lm_head, level.topk, impl)
                    for level, x in zip(flat, states)}  # own LM heads: one product each
        k = max(level.topk for level in flat)
        ids = self._draft_topk(flat[0].depth - 1, torch.cat(states), base_lm_head, k, impl).view(len(flat), B, k)
        return {level.depth: ids[j, :, :level.topk] for j, level in enumerate(flat)}

    def _draft_topk(self, i: int, x: torch.Tensor, base_lm_head, k: int, impl) -> torch.Tensor:
        """Token ids [R, k] of head i's k most likely drafts from its state x [R, d] (``row_topk`` picks them)."""
        if self.draft_vocab is None:
            return row_topk(self.logits(i, x, base_lm_head), k, impl)[1]
        self._check_draft_k(i, k)
        own = self.heads[i].lm_head
        return self.draft_vocab.topk(-1 if own is None else i, x, base_lm_head if own is None else own, k, impl)

    def draft_scores(self, i: int, x: torch.Tensor, base_lm_head, k: int,
                     impl=reference) -> tuple[torch.Tensor, torch.Tensor]:
        """Head i's k most likely drafts from its state x [R, d] and their log-probabilities (softmax over the
        draft vocabulary when one is used): (logp float32 [R, k], token ids int64 [R, k]). impl: the ops module
        (``ops.implementation``); ``row_topk`` picks the k."""
        if self.draft_vocab is None:
            logits, ids = self.logits(i, x, base_lm_head).float(), None
        else:
            self._check_draft_k(i, k)
            own = self.heads[i].lm_head
            logits = self.draft_vocab.logits(-1 if own is None else i, x,
                                             base_lm_head if own is None else own).float()
            ids = self.draft_vocab.ids
        top, pos = row_topk(logits, k, impl)
        logp = top - torch.logsumexp(logits, dim=-1, keepdim=True)
        return logp, pos if ids is None else ids[pos]

    def _check_draft_k(self, i: int, k: int) -> None:
        if k > self.draft_vocab.size:
            raise ValueError(f"the tree drafts the top {k} tokens at depth {i + 1} but the draft vocabulary has "
                             f"{self.draft_vocab.size}: use a larger draft vocabulary or a narrower tree")

    def set_draft_vocab(self, ids: torch.Tensor | None) -> None:
        """Draft from these token ids only (int [V']), or from the full vocabulary (None). Verification is
        untouched, so greedy output stays the base model's; engines built before must be rebuilt."""
        if ids is None:
            self.draft_vocab = None
            return
        if ids.dim() != 1 or ids.numel() < 1 or int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size \
                or ids.unique().numel() != ids.numel():
            raise ValueError(f"draft vocabulary ids must be distinct token ids in 0..{self.config.vocab_size - 1}, "
                             f"got shape {tuple(ids.shape)}")
        device = next(self.parameters()).device
        self.draft_vocab = DraftVocab(ids.to(device))

    def use_draft_vocab(self, size: int) -> None:
        """Draft from the first ``size`` ids of the loaded ``draft_vocab_file`` (0 or >= V: full vocabulary);
        the config records the size, so save_pretrained keeps it."""
        V = self.config.vocab_size
        if size < 0:
            raise ValueError(f"draft vocabulary size must be >= 0 (0: full vocabulary), got {size}")
        if 0 < size < V and self.draft_vocab_file is None:
            raise ValueError(f"a draft vocabulary of {size} tokens needs the heads folder's draft_vocab.safetensors; "
                             "build it with `hydra-fast-train vocab`")
        size = 0 if size >= V else size
        self.set_draft_vocab(self.draft_vocab_file.ids[:size] if size else None)
        self.config = dataclasses.replace(self.config, draft_vocab_size=size)

    def prepare_draft(self, base_lm_head) -> None:
        """Gather the compact LM heads of a reduced draft vocabulary now (again when a weight changed), outside
        a compiled or captured step: compiled drafts use what was gathered here."""
        if self.draft_vocab is None:
            return
        for i, head in enumerate(self.heads):
            own = head.lm_head is not None
            self.draft_vocab.prepare(i if own else -1, head.lm_head if own else base_lm_head)

    def forward_train(self, hidden, input_ids, base_lm_head, embed_weight, impl=None, position_embeddings=None,
                      attention_mask=None) -> list[torch.Tensor]:
        """Teacher-forced logits of every head over a sequence: list of [B, T, V], one per head.

        hidden [B, T, d]: the base's last hidden states; input_ids int64 [B, T]. Head i at position t predicts
        input_ids[t + i + 2] from hidden[t] and (Hydra) input_ids[t + 1 .. t + i + 1]; positions
        t < T - i - 2 are valid (compare logits[i][:, :T - i - 2] with input_ids[:, i + 2:]), later ones
        read padding. Hydra++ first runs the prefix layer, causally over the sequence: pass
        position_embeddings = base.model.rotary_emb(hidden, position_ids) and optionally attention_mask
        [B, T] (1 = real token); it uses the base config's attention implementation (eager or SDPA) with an
        additive causal mask and ignores sliding windows. impl defaults to the differentiable reference ops.
        """
        B, T, _ = hidden.shape
        states = self.train_states(hidden, input_ids, embed_weight, impl, position_embeddings, attention_mask)
        return [self.logits(i, y.reshape(B * T, -1), base_lm_head).view(B, T, -1)  # [B, T, V]
                for i, y in enumerate(states)]

    def train_states(self, hidden, input_ids, embed_weight, impl=None, position_embeddings=None,
                     attention_mask=None) -> list[torch.Tensor]:
        """forward_train before the LM heads: every head's output state, list of [B, T, d].

        Lets a trainer project only the rows it scores (``logits(i, states[i][rows], lm_head)``)."""
        impl = reference if impl is None else impl
        B, T, d = hidden.shape
        if self.prefix_layer is not None:
            if position_embeddings is None:
                raise ValueError("hydra++ heads need position_embeddings for the prefix layer: pass "
                                 "base_model.model.rotary_emb(hidden, position_ids)")
            hidden = self._prefix(hidden, position_embeddings, attention_mask)
        x = hidden.reshape(B * T, d)  # [B*T, d]
        out = []
        for head in self.heads:
            k = head.path_len
            if k == 0:
                tokens = input_ids.new_zeros(B, T, 0)
            else:
                padded = F.pad(input_ids, (0, k))  # [B, T + k], token 0 past the end
                tokens = padded[:, 1:].unfold(1, k, 1)  # [B, T, k]: input_ids[t + 1 .. t + k]
            out.append(head(x, tokens.reshape(B * T, k), embed_weight, impl).view(B, T, d))  # [B, T, d]
        return out

    def _prefix(self, hidden, position_embeddings, attention_mask) -> torch.Tensor:
        B, T, _ = hidden.shape
        allowed = torch.ones(T, T, dtype=torch.bool, device=hidden.device).tril().view(1, 1, T, T)
        if attention_mask is not None:
            allowed = allowed & attention_mask.to(torch.bool).view(B, 1, 1, T)  # [B, 1, T, T]
        mask = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device)
        mask = mask.masked_fill(~allowed, torch.finfo(hidden.dtype).min)  # additive; no -inf, no NaN rows
        out = self.prefix_layer(hidden, attention_mask=mask, position_embeddings=position_embeddings,
                                use_cache=False)
        return out[0] if isinstance(out, tuple) else out

    def save_pretrained(self, directory: str | os.PathLike, max_shard_size: int | str = "15MB") -> None:
        """config.json + safetensors weights, sharded (with an index json) above max_shard_size.

        Written to a new folder beside ``directory`` and swapped in whole (other files of an earlier save, such
        as a model card or tree files, are kept): a crash leaves the old heads or the new ones. A folder that
        holds something other than heads (a model's weights or config) is refused, never overwritten."""
        from huggingface_hub import split_torch_state_dict_into_shards
        from safetensors.torch import save_file

        from hydra_fast import safe_io

        check_heads_folder(directory)
        # own copies: safetensors refuses tensors that share storage (tied or viewed weights)
        state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.state_dict().items()}
        split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                                   max_shard_size=max_shard_size)
        new = safe_io.new_folder_beside(directory)
        try:
            for filename, names in split.filename_to_tensors.items():
                save_file({n: state[n] for n in names}, new / filename, metadata={"format": "pt"})
            if split.is_sharded:
                with open(new / INDEX_NAME, "w") as f:
                    json.dump({"metadata": split.metadata, "weight_map": split.tensor_to_filename}, f, indent=2)
            dtype = _dtype_name(next(iter(state.values())).dtype) if state else self.config.dtype
            with open(new / CONFIG_NAME, "w") as f:
                json.dump(dataclasses.replace(self.config, dtype=dtype).to_dict(), f, indent=2)
            if self.draft_vocab_file is not None:
                self.draft_vocab_file.save(new)
            # stale shards of an earlier save would shadow this one: only other files carry over
            safe_io.swap_in_folder(new, directory, carry_over=lambda name: not is_weights_file(name))
        except BaseException:
            safe_io.discard(new)
            raise

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, base_model: nn.Module, device=None,
                        dtype=None, draft_vocab: int | None = None) -> DraftHeads:
        """Load heads saved by save_pretrained for base_model (checked by fingerprint: HeadsMismatchError).

        device and dtype default to the base LM head's. ``draft_vocab``: draft from that many of the folder's
        draft_vocab.safetensors ids (0: full vocabulary; None: the config's draft_vocab_size)."""
        directory = os.fspath(directory)
        config_path = os.path.join(directory, CONFIG_NAME)
        try:
            with open(config_path) as f:
                config = HeadsConfig.from_dict(json.load(f))
        except FileNotFoundError:
            raise HeadsCheckpointError(f"{config_path}: missing; is {directory} a heads directory "
                                       "written by DraftHeads.save_pretrained?") from None
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise HeadsCheckpointError(f"{config_path}: unreadable heads config ({type(e).__name__}: {e})") from e
        heads = cls(config, base_model.config)
        check_compatible(heads, base_model, source=f"the heads in {directory}")
        weight = base_model.get_output_embeddings().weight
        heads.to(device=device or weight.device, dtype=dtype or weight.dtype)
        heads.load_state_dict(read_weights(directory, heads.state_dict()))
        size = config.draft_vocab_size if draft_vocab is None else draft_vocab
        if os.path.exists(os.path.join(directory, DRAFT_VOCAB_NAME)) or 0 < size < config.vocab_size:
            heads.draft_vocab_file = DraftVocabFile.load(directory, config.vocab_size)
        heads.use_draft_vocab(size)
        return heads


def _config_from_dict(d: dict):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not d or d.get("model_type") not in CONFIG_MAPPING:
        raise ValueError("hydra++ heads need the base model config (HeadsConfig.base_config) with a known "
                         f"model_type, got {d.get('model_type') if d else None!r}")
    config = CONFIG_MAPPING[d["model_type"]].from_dict(d)
    config._attn_implementation = "sdpa"
    return config


def _decoder_layer_class(config) -> type:
    """The ``<Arch>DecoderLayer`` class of the transformers causal-LM class for ``config``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        model_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise ValueError(f"transformers has no causal LM for {type(config).__name__}: cannot build a "
                         "hydra++ prefix layer") from None
    module = importlib.import_module(model_cls.__module__)
    preferred = model_cls.__name__.removesuffix("ForCausalLM") + "DecoderLayer"
    names = [preferred] + sorted(n for n in vars(module) if n.endswith("DecoderLayer"))
    for name in names:
        if isinstance(getattr(module, name, None), type):
            return getattr(module, name)
    raise ValueError(f"{model_cls.__module__} defines no *DecoderLayer class: cannot build a hydra++ prefix layer")


def _decoder_layers(base_model: nn.Module) -> nn.ModuleList:
    decoder = base_model.get_decoder() if hasattr(base_model, "get_decoder") else None
    if decoder is None:
        decoder = getattr(base_model, base_model.base_model_prefix)
    return decoder.layers


@torch.no_grad()
def zero_residual_branches_(layer: nn.Module) -> int:
    """Zero a decoder layer's attention and MLP output projections (o_proj, down_proj in the Llama-style
    families) so the layer maps its input to itself. Returns how many projections were zeroed."""
    zeroed = 0
    for name, module in layer.named_modules():
        if name.rsplit(".", 1)[-1] in ("o_proj", "down_proj") and isinstance(module, nn.Linear):
            module.weight.zero_()
            if module.bias is not None:
                module.bias.zero_()
            zeroed += 1
    return zeroed
