"""Mixed-task forwards of a Llama causal LM (tied embedding and LM head, like SmolLM2): one forward
of the untouched base serves rows of several tasks, each delta a correction on its own rows.

Properties: per row group, prefill (left padding, attention mask, position ids) and greedy decode
with a KV cache give logits within 1e-5 (fp32; smollm2: 1e-5 of its largest logit) of each task's
offline merged model and the same tokens, on both the compiled CPU kernels and the torch sparse
path, also with the batch's main task swapped in (the others corrected against it), also for
Mistral, Qwen2 and an untied LM head; outside a mixing context the hooks change no bit; what cannot
be mixed says why; the extra bytes of the mixing form are counted once per tensor.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import pytest
import torch

from taskdelta.deltas import (
    Base,
    Swapper,
    _mixed_kernel,
    bind_base,
    load_base,
    merge_into,
    prepare,
    random_delta,
)
from taskdelta.deltas.mixed import Mixer, SparseMatrix
from taskdelta.deltas.swap import PreparedDelta

LOGITS_ATOL = 1e-5  # fp32: mixed vs merged logits, the documented tolerance (the tiny model)
# smollm2's logits reach ~35 and its merged model, fp32, does not agree with itself at 1e-5 (one
# row at a time vs the batch: 3.7e-5; vs float64: 5e-5): the bound is relative to the logit scale
LOGITS_RTOL = 1e-5
STEPS = 8  # greedy decode steps after the prefill
ROW_TASKS = [0, 0, None, 1, 2, 2, 2, 3, None]  # each batch row's task (None: the base)
PROMPT_LENGTHS = [5, 9, 3, 7, 9, 4, 6, 8, 2]

Context = Callable[[], AbstractContextManager]


@pytest.fixture(params=["kernel", "torch"])
def mixer_path(request, monkeypatch) -> Iterator[str]:
    """Mixers made in the test correct on the compiled kernels, or on torch ops."""
    if request.param == "torch":
        monkeypatch.setenv(_mixed_kernel.DISABLE_ENV, "0")
    _mixed_kernel.reset()
    yield request.param
    _mixed_kernel.reset()


@pytest.fixture
def mixer(mixer_path, tiny_llama) -> Iterator[Mixer]:
    """A Mixer on the tiny Llama, on the path asked for."""
    m = Mixer(tiny_llama)
    assert (m._kernel is None) == (mixer_path == "torch"), "the path was not the one asked for"
    yield m
    m.close()


def llama_deltas(base: Base, count: int = 4, density: float = 0.05) -> list:
    """Random generate deltas touching every tensor: embedding (= LM head), q/k/v/o,
    gate/up/down, the layers' RMSNorms and the final norm."""
    return [random_delta(base, density, seed=300 + i, kind="generate", scale=0.05)
            for i in range(count)]


def merged_model(model_dir: Path, delta) -> torch.nn.Module:
    """The offline merged model: a fresh copy of the base with the delta merged in."""
    ref = load_base(model_dir, device="cpu")
    merge_into(ref.params, prepare(delta, ref))
    return ref.model


def left_padded(lengths: list[int], pad: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of these lengths, left-padded to one width: (ids, attention mask)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, width - n:] = torch.randint(1000, 30000, (n,), generator=gen)
        mask[r, width - n:] = 1
    return ids, mask


def segments_of(row_tasks: list[int | None], mixed: list) -> list[tuple[int, int, object]]:
    """Contiguous runs of one task -> (start, end, its MixedDelta or None); a trailing base run
    is left out (the mixer fills gaps with base rows)."""
    runs: list[tuple[int, int, object]] = []
    for r, t in enumerate(row_tasks):
        if runs and runs[-1][2] is (mixed[t] if t is not None else None) and r == runs[-1][1]:
            runs[-1] = (runs[-1][0], r + 1, runs[-1][2])
        else:
            runs.append((r, r + 1, mixed[t] if t is not None else None))
    return runs[:-1] if runs[-1][2] is None else runs


@torch.no_grad()
def greedy(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, steps: int,
           context: Context = nullcontext) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Prefill then `steps` greedy decode steps with the KV cache, each forward inside
    `context()`: (logits of every forward, [rows, steps] chosen tokens)."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens only
    with context():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    logits, tokens = [out.logits], []
    for _ in range(steps):
        nxt = logits[-1][:, -1].argmax(-1, keepdim=True)  # [rows, 1]
        tokens.append(nxt)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        pos = pos[:, -1:] + 1
        with context():
            out = model(input_ids=nxt, attention_mask=mask, position_ids=pos,
                        cache=out.past_key_values, use_cache=True)
        logits.append(out.logits)
    return logits, torch.cat(tokens, dim=1)


def compare_rows(got: tuple[list[torch.Tensor], torch.Tensor],
                 want: tuple[list[torch.Tensor], torch.Tensor], rows: list[int],
                 mask: torch.Tensor) -> float:
    """Same greedy tokens on these rows, and the largest logit difference there (prefill: at the
    real tokens only; a pad position's output is never used)."""
    assert torch.equal(got[1][rows], want[1][rows]), "greedy tokens differ"
    real = mask[rows].bool()  # [rows, seq]
    worst = float((got[0][0][rows] - want[0][0][rows])[real].abs().max())
    for g, w in zip(got[0][1:], want[0][1:], strict=True):
        worst = max(worst, float((g[rows] - w[rows]).abs().max()))
    return worst


def test_mixed_prefill_and_decode_match_each_tasks_merged_model(mixer, tiny_llama, tiny_llama_dir):
    made = llama_deltas(tiny_llama)
    prepared = [prepare(d, tiny_llama, name=f"t{i}") for i, d in enumerate(made)]
    assert all(mixer.why_not(p) is None for p in prepared)
    mixed = [mixer.build(p) for p in prepared]
    ids, mask = left_padded(PROMPT_LENGTHS, tiny_llama.config.pad_token_id)
    segments = segments_of(ROW_TASKS, mixed)
    got = greedy(tiny_llama.model, ids, mask, STEPS,
                 lambda: mixer.mixing(segments, len(ROW_TASKS)))
    plain = greedy(tiny_llama.model, ids, mask, STEPS)  # the base itself (hooks inert)

    base_rows = [r for r, t in enumerate(ROW_TASKS) if t is None]
    worst = compare_rows(got, plain, base_rows, mask)
    for t, delta in enumerate(made):
        rows = [r for r, task in enumerate(ROW_TASKS) if task == t]
        want = greedy(merged_model(tiny_llama_dir, delta), ids, mask, STEPS)
        worst = max(worst, compare_rows(got, want, rows, mask))
        moved = float((want[0][-1][rows] - plain[0][-1][rows]).abs().max())
        assert moved > 100 * LOGITS_ATOL, "the delta hardly changes the logits: a weak test"
    print(f"\nmixed vs merged, prefill + {STEPS} decode steps: max abs logit diff {worst:.2e}")
    assert worst <= LOGITS_ATOL


def test_against_a_swapped_in_task_each_row_still_matches_its_merged_model(
        mixer, tiny_llama, tiny_llama_dir):
    """The batch's main task swapped into the base: its rows run the weights as they are, every
    other row (base rows too) gets minus its delta and plus its own."""
    made = llama_deltas(tiny_llama, count=3)
    prepared = [prepare(d, tiny_llama, name=f"w{i}") for i, d in enumerate(made)]
    mixed = [mixer.build(p) for p in prepared]
    row_tasks = [0, 0, 1, None, 2, 0]
    ids, mask = left_padded([4, 7, 5, 6, 3, 5], tiny_llama.config.pad_token_id, seed=4)
    segments = segments_of(row_tasks, mixed)
    with Swapper(tiny_llama).swapped(prepared[0]) as model:
        got = greedy(model, ids, mask, 4,
                     lambda: mixer.mixing(segments, len(row_tasks), swapped=mixed[0]))
    plain = greedy(tiny_llama.model, ids, mask, 4)
    worst = compare_rows(got, plain, [3], mask)
    for t, d in enumerate(made):
        rows = [r for r, task in enumerate(row_tasks) if task == t]
        worst = max(worst, compare_rows(got, greedy(merged_model(tiny_llama_dir, d), ids, mask, 4),
                                        rows, mask))
    assert worst <= LOGITS_ATOL


@torch.no_grad()
def test_prefill_keeping_only_the_last_logits_corrects_that_position(mixer, tiny_llama,
                                                                      tiny_llama_dir):
    """A prefill that asks for the last position's logits only (the LM head sees one token a
    row): that position's logits are still each task's merged model's."""
    made = llama_deltas(tiny_llama, count=1)
    mixed = mixer.build(prepare(made[0], tiny_llama))
    ids, mask = left_padded([3, 6, 5], tiny_llama.config.pad_token_id, seed=3)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with mixer.mixing([(1, 3, mixed)], 3):
        got = tiny_llama.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                               logits_to_keep=1).logits  # [rows, 1, vocab]
    want = merged_model(tiny_llama_dir, made[0])(input_ids=ids, attention_mask=mask,
                                                 position_ids=pos).logits[:, -1:]
    plain = tiny_llama.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1:]
    assert got.shape == (3, 1, tiny_llama.config.vocab_size)
    assert float((got[1:] - want[1:]).abs().max()) <= LOGITS_ATOL
    assert float((got[:1] - plain[:1]).abs().max()) <= LOGITS_ATOL


@pytest.mark.parametrize("family", ["mistral", "qwen2", "llama-untied"])
def test_other_llama_family_models_mix_like_llama(family, mixer_path):
    """Mistral and Qwen2 (biases on q/k/v) are Llama's modules under other names, and an untied
    LM head is one more Linear: same property."""
    import transformers

    config_cls, model_cls = {
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "llama-untied": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}[family]
    cfg = config_cls(vocab_size=3000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1,
                     tie_word_embeddings=family != "llama-untied", pad_token_id=0)
    torch.manual_seed(0)
    base = bind_base(model_cls(cfg).eval(), None, name=family, path=None, fingerprint=family)
    merged = bind_base(copy.deepcopy(base.model), None, name=family, path=None, fingerprint=family)
    delta = random_delta(base, 0.05, seed=7, kind="generate", scale=0.05)
    merge_into(merged.params, prepare(delta, merged))
    mixer = Mixer(base)
    try:
        assert (mixer._kernel is None) == (mixer_path == "torch")
        assert set(mixer._targets) == set(base.params), "every tensor is corrected"
        assert ("lm_head.weight" in base.params) == (family == "llama-untied")
        mixed = mixer.build(prepare(delta, base))
        ids, mask = left_padded([5, 7, 3], 0)
        ids %= 3000
        with torch.no_grad():
            got = greedy(base.model, ids, mask, 4, lambda: mixer.mixing([(0, 2, mixed)], 3))
    finally:
        mixer.close()
    assert compare_rows(got, greedy(merged.model, ids, mask, 4), [0, 1], mask) <= LOGITS_ATOL
    assert compare_rows(got, greedy(base.model, ids, mask, 4), [2], mask) <= LOGITS_ATOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_torch_path_matches_each_tasks_merged_model(tiny_llama_dir):
    """On CUDA the mixer takes the torch sparse path; same property as on CPU."""
    base = load_base(tiny_llama_dir, device="cuda")
    mixer = Mixer(base)
    try:
        assert mixer._kernel is None
        made = llama_deltas(base, count=2)
        mixed = [mixer.build(prepare(d, base, name=f"c{i}")) for i, d in enumerate(made)]
        row_tasks = [0, None, 1, 1]
        ids, mask = (t.cuda() for t in left_padded([4, 6, 5, 2], base.config.pad_token_id))
        segments = segments_of(row_tasks, mixed)
        got = greedy(base.model, ids, mask, 4, lambda: mixer.mixing(segments, len(row_tasks)))
    finally:
        mixer.close()
    for t, d in [(None, None), *enumerate(made)]:
        ref = base.model if d is None else merged_model(tiny_llama_dir, d).cuda()
        rows = [r for r, task in enumerate(row_tasks) if task == t]
        assert compare_rows(got, greedy(ref, ids, mask, 4), rows, mask) <= LOGITS_ATOL


@torch.no_grad()
def test_mixed_backbone_states_match_the_merged_backbone(mixer, tiny_llama, tiny_llama_dir):
    """Embed tasks of a Llama run the backbone only (no LM head): its states per row group."""
    made = llama_deltas(tiny_llama, count=2)
    mixed = [mixer.build(prepare(d, tiny_llama, name=f"e{i}")) for i, d in enumerate(made)]
    ids, mask = left_padded([4, 6, 6, 3], tiny_llama.config.pad_token_id, seed=1)
    with mixer.mixing([(0, 2, mixed[0]), (3, 4, mixed[1])], 4):
        got = tiny_llama.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    for d, rows in ((made[0], [0, 1]), (made[1], [3]), (None, [2])):
        ref = tiny_llama.model if d is None else merged_model(tiny_llama_dir, d)
        want = ref.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        real = mask[rows].bool()
        assert float((got[rows] - want[rows])[real].abs().max()) <= LOGITS_ATOL


@torch.no_grad()
def test_hooks_change_no_bit_outside_a_mixing_context(tiny_llama, tiny_llama_dir):
    """One-task forwards (the base, or a task swapped in) give the same bits with the mixer's hooks
    registered as without them, and the swapped-in task's bits are the merged model's."""
    delta = llama_deltas(tiny_llama, count=1)[0]
    ids, mask = left_padded([6, 3], tiny_llama.config.pad_token_id, seed=2)
    mixer = Mixer(tiny_llama)
    try:
        mixer.build(prepare(delta, tiny_llama))  # built corrections alone do nothing either
        hooked_base = tiny_llama.model(input_ids=ids, attention_mask=mask).logits
        with Swapper(tiny_llama).swapped(prepare(delta, tiny_llama)) as model:
            hooked_task = model(input_ids=ids, attention_mask=mask).logits
    finally:
        mixer.close()
    assert torch.equal(hooked_base, tiny_llama.model(input_ids=ids, attention_mask=mask).logits)
    merged = merged_model(tiny_llama_dir, delta)(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(hooked_task, merged)


def test_what_cannot_be_mixed_says_why(tiny_llama, tiny_llama_dir, monkeypatch):
    mixer = Mixer(tiny_llama)
    try:
        assert set(mixer._targets) == set(tiny_llama.params), "every Llama tensor is corrected"
        assert len(mixer._targets["model.embed_tokens.weight"]) == 2, "embedding and LM head"
        classify = prepare(random_delta(tiny_llama, 0.01, kind="classify"), tiny_llama)
        assert "head" in mixer.why_not(classify)  # a last-token classifier runs its own backbone
        p = prepare(llama_deltas(tiny_llama, count=1)[0], tiny_llama)
        norm = next(n for n in p.names if "layernorm" in n)
        uses = mixer._targets.pop(norm)  # as if it were a tensor the mixer cannot correct
        try:
            assert norm in mixer._why_not(p)
            with pytest.raises(ValueError, match="cannot be mixed"):
                mixer.build(p)
        finally:
            mixer._targets[norm] = uses
    finally:
        mixer.close()
    bf16 = load_base(tiny_llama_dir, device="cpu", dtype="bfloat16")
    mixer = Mixer(bf16)
    try:
        assert "float32" in mixer.why_not(prepare(random_delta(bf16, 0.01), bf16))
    finally:
        mixer.close()
    monkeypatch.setattr(tiny_llama.config, "model_type", "gpt2")  # a model type not handled
    mixer = Mixer(tiny_llama)
    try:
        assert not mixer._handles, "no hooks on a base the mixer does not handle"
        assert "'gpt2'" in mixer.why_not(prepare(random_delta(tiny_llama, 0.01), tiny_llama))
    finally:
        mixer.close()


@torch.no_grad()
def test_a_new_composition_on_the_same_rows_gets_its_own_plans(mixer, tiny_llama, tiny_llama_dir):
    """Plans are kept across steps of one composition; other tasks on the same rows (or the same
    tasks against a swap) are a new composition, never served the kept plans."""
    made = llama_deltas(tiny_llama, count=2)
    prepared = [prepare(d, tiny_llama, name=f"n{i}") for i, d in enumerate(made)]
    mixed = [mixer.build(p) for p in prepared]
    ids, mask = left_padded([5, 5], tiny_llama.config.pad_token_id, seed=5)
    for t in (0, 1, 0):
        with mixer.mixing([(0, 1, mixed[t])], 2):
            got = tiny_llama.model(input_ids=ids, attention_mask=mask).logits
        want = merged_model(tiny_llama_dir, made[t])(input_ids=ids, attention_mask=mask).logits
        assert float((got[:1] - want[:1]).abs().max()) <= LOGITS_ATOL
    with Swapper(tiny_llama).swapped(prepared[1]) as model:  # row 0: task 0 against task 1
        with mixer.mixing([(0, 1, mixed[0])], 2, swapped=mixed[1]):
            got = model(input_ids=ids, attention_mask=mask).logits
    assert float((got[:1] - want[:1]).abs().max()) <= LOGITS_ATOL


def test_segments_out_of_order_or_outside_the_batch_are_refused(tiny_llama):
    mixer = Mixer(tiny_llama)
    try:
        m = mixer.build(prepare(llama_deltas(tiny_llama, count=1)[0], tiny_llama))
        for bad in ([(2, 4, m), (1, 2, None)], [(0, 5, m)], [(3, 2, m)]):
            with pytest.raises(ValueError, match="segment"), mixer.mixing(bad, 4):
                pass
    finally:
        mixer.close()


def expected_csr_bytes(p: PreparedDelta, base: Base) -> int:
    """crow + col of each matrix the delta touches, once per tensor (a tied one is one tensor)."""
    return sum((base.params[n].shape[0] + 1 + i.numel()) * i.element_size()
               for n, i in zip(p.names, p.idx, strict=True) if base.params[n].dim() == 2)


def test_mixing_form_bytes_are_counted_once_per_tensor(mixer, tiny_llama):
    p = prepare(llama_deltas(tiny_llama, count=1)[0], tiny_llama)
    got = mixer.build(p)
    norms = sum(tiny_llama.params[n].nbytes for n in p.names if tiny_llama.params[n].dim() == 1)
    csr = expected_csr_bytes(p, tiny_llama) if mixer._kernel is None else 0
    assert got.nbytes == norms + csr
    embed, head = got.fixes["model.embed_tokens"], got.fixes["lm_head"]
    assert isinstance(embed.weight, SparseMatrix) and embed.weight is head.weight, "one ΔE, 2 uses"


# --- the real model ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm() -> Base:
    return load_base("smollm2-135m", device="cpu")


def swapped_greedy(base: Base, p: PreparedDelta | None, ids: torch.Tensor, mask: torch.Tensor,
                   steps: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The task swapped into the base (bit-identical to its merged model): the reference."""
    if p is None:
        return greedy(base.model, ids, mask, steps)
    with Swapper(base).swapped(p) as model:
        return greedy(model, ids, mask, steps)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_smollm2_mixed_decode_matches_each_swapped_in_task(path, smollm, monkeypatch):
    if path == "torch":
        monkeypatch.setenv(_mixed_kernel.DISABLE_ENV, "0")
    _mixed_kernel.reset()
    mixer = Mixer(smollm)
    try:
        assert (mixer._kernel is None) == (path == "torch")
        prepared = [prepare(random_delta(smollm, 0.01, seed=500 + i, scale=0.02), smollm,
                            name=f"s{i}") for i in range(3)]
        mixed = [mixer.build(p) for p in prepared]
        prompts = ["The capital of France is", "def fib(n):", "Once upon a time, there",
                   "1, 2, 3,"]
        row_tasks = [0, 1, None, 2]
        encoded = [smollm.tokenizer(t)["input_ids"] for t in prompts]
        ids, mask = left_padded([len(e) for e in encoded], smollm.tokenizer.pad_token_id)
        for r, e in enumerate(encoded):
            ids[r, ids.shape[1] - len(e):] = torch.tensor(e)
        steps = 6
        segments = segments_of(row_tasks, mixed)
        got = greedy(smollm.model, ids, mask, steps, lambda: mixer.mixing(segments, len(row_tasks)))
    finally:
        mixer.close()
        _mixed_kernel.reset()
    worst = 0.0
    for t, p in [(None, None), *enumerate(prepared)]:
        rows = [r for r, task in enumerate(row_tasks) if task == t]
        worst = max(worst, compare_rows(got, swapped_greedy(smollm, p, ids, mask, steps), rows, mask))
    scale = max(float(g.abs().max()) for g in got[0])
    print(f"\nsmollm2 ({path}): mixed vs swapped-in, max abs logit diff {worst:.2e} "
          f"({worst / scale:.1e} of the largest logit, {scale:.1f})")
    assert worst <= LOGITS_RTOL * scale
