"""sacpo.models.row_cost: the FLOP model that chooses shared-prompt rows or two padded rows per pair."""

from sacpo.data.tokenize import Encoded
from sacpo.models.row_cost import RowCost, packing_pays
from sacpo.models.tiny import build_tiny_gpt2


def pair(p: int, c: int, r: int) -> tuple[Encoded, Encoded]:
    prompt = tuple(range(1, p + 1))
    return Encoded(prompt + (7,) * c, p), Encoded(prompt + (8,) * r, p)


def test_rows_by_hand():
    cost = RowCost(lin=10.0, att=1.0)
    assert cost.rows([2, 3]) == 2 * 10 + 4 + 3 * 10 + 9 == 63
    assert cost.rows([]) == 0


def test_packing_pays_for_long_prompts_and_not_for_long_responses():
    cost = RowCost(lin=100.0, att=1.0)
    # p 40, c = r = 10: packed 1 row of 60 (6000 + 3600) vs 2 rows of 50 (2·(5000 + 2500))
    assert cost.rows([60]) == 9600 and cost.rows([50, 50]) == 15000
    assert packing_pays(cost, [pair(40, 10, 10)])
    # p 4, c = r = 200: packed 1 row of 404 vs 2 rows of 204: 40400 + 163216 > 2·(20400 + 41616)
    assert not packing_pays(cost, [pair(4, 200, 200)])
    # widths are the batch's padded widths: the longest pair sets both
    assert packing_pays(cost, [pair(40, 10, 10), pair(40, 10, 10)]) == packing_pays(cost, [pair(40, 10, 10)])
    # without attention cost packing always saves the prompt's dense FLOPs
    assert packing_pays(RowCost(lin=1.0, att=0.0), [pair(4, 200, 200)])


def test_cost_of_a_model_from_its_config_and_parameters(tmp_path):
    from sacpo.models.load import load_model

    model = load_model(build_tiny_gpt2(tmp_path / "m", n_positions=64))
    cost = RowCost.of(model)
    cfg = model.config
    blocks = (
        sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    )  # tied head
    assert cost == RowCost(lin=2.0 * blocks, att=4.0 * cfg.n_embd * cfg.n_layer)
    assert RowCost.of(object()) is None  # no config: the caller keeps shared-prompt rows


def test_the_reference_pass_decides_over_its_own_batches():
    cost = RowCost(lin=100.0, att=1.0)
    assert packing_pays(cost, [pair(40, 10, 10)] * 4, batch_size=4)
    assert not packing_pays(cost, [pair(4, 200, 200)] * 4, batch_size=4)
    assert packing_pays(None, [pair(4, 200, 200)], batch_size=4)  # no cost model: pack, as before
