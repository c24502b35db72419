import torch

from taskdelta.deltas import Swapper, dumps, loads, prepare, random_delta, validate


def test_tiny_models_load_and_swap(tiny_bert, tiny_llama):
    assert tiny_llama.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    for base in (tiny_bert, tiny_llama):
        delta = loads(dumps(random_delta(base, 0.05, seed=1)))
        validate(delta, base)
        before = {n: p.clone() for n, p in base.params.items()}
        sw = Swapper(base)
        with sw.swapped(prepare(delta, base)):
            assert any(not torch.equal(before[n], p) for n, p in base.params.items())
        assert all(torch.equal(before[n], p) for n, p in base.params.items())
