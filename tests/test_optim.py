"""RowSparseAdamW against torch AdamW, the combined optimizer, and clipping of mixed grads."""
import copy
import pytest
import torch
from torch import nn

from monoroute.errors import MonorouteError
from monoroute.layers import RoutedFFN
from monoroute.train.optim import RowSparseAdamW, build_optimizer, clip_grad_norm_, coalesced, touched_rows

HP = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def table_pair(n=6, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, d, generator=g, dtype=torch.float64)
    return nn.Parameter(w.clone()), nn.Parameter(w.clone())


@pytest.mark.parametrize("sparse", [False, True])
def test_all_rows_touched_equals_adamw(sparse):
    ours, ref = table_pair()
    bias_ours = nn.Parameter(torch.linspace(-1, 1, 6, dtype=torch.float64))
    bias_ref = nn.Parameter(bias_ours.detach().clone())
    opt = RowSparseAdamW([ours, bias_ours], **HP)
    ref_opt = torch.optim.AdamW([ref, bias_ref], **HP, fused=True)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        grad = torch.randn(6, 4, generator=g, dtype=torch.float64)
        bias_grad = torch.randn(6, generator=g, dtype=torch.float64)
        ref.grad, bias_ref.grad = grad.clone(), bias_grad.clone()
        ours.grad = grad.to_sparse(sparse_dim=1) if sparse else grad.clone()
        bias_ours.grad = bias_grad.to_sparse() if sparse else bias_grad.clone()
        opt.step()
        ref_opt.step()
    assert torch.equal(ours, ref)
    assert torch.equal(bias_ours, bias_ref)
    assert torch.equal(opt.state[ours]["exp_avg_sq"], ref_opt.state[ref]["exp_avg_sq"])


def test_untouched_rows_bit_identical_and_bias_correction_by_the_parameters_step():
    ours, _ = table_pair()
    before = ours.detach().clone()
    opt = RowSparseAdamW([ours], **HP)
    touched = torch.tensor([1, 4])
    ref = nn.Parameter(before[touched].clone())  # torch AdamW on the touched rows alone
    ref_opt = torch.optim.AdamW([ref], **HP, fused=True)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        values = torch.randn(2, 4, generator=g, dtype=torch.float64)
        # Duplicate entries for row 4 check that the gradient is coalesced (summed) first.
        entries = torch.cat([values, values[1:] * 0])
        ours.grad = torch.sparse_coo_tensor(torch.tensor([[1, 4, 4]]), entries, (6, 4), check_invariants=True)
        ref.grad = values.clone()
        opt.step()
        ref_opt.step()
    assert torch.equal(ours[touched], ref)
    untouched = torch.tensor([0, 2, 3, 5])
    assert torch.equal(ours[untouched], before[untouched])
    assert torch.equal(opt.state[ours]["exp_avg"][untouched], torch.zeros(4, 4, dtype=torch.float64))
    assert opt.state[ours]["step"].item() == 3
    assert not torch.equal(ours[touched], before[touched])

    # A row touched for the first time at the parameter's step 4 gets step 4's bias correction (as
    # torch SparseAdam and TF LazyAdam): its moments hold one gradient, m = 0.1 g and v = 0.05 g^2,
    # so it moves by lr * (0.1 / 0.3439) / (sqrt(0.05 / 0.18549375)) ~ 0.56 lr per coordinate, not lr.
    row0 = ours[0].detach().clone()
    grad = torch.tensor([[0.5, -2.0, 3.0, -0.1]], dtype=torch.float64)
    ours.grad = torch.sparse_coo_tensor(torch.tensor([[0]]), grad, (6, 4), check_invariants=True)
    opt.step()
    b1, b2 = HP["betas"]
    m, v = (1 - b1) * grad[0], (1 - b2) * grad[0] ** 2
    move = HP["lr"] / (1 - b1**4) * m / (v.sqrt() / (1 - b2**4) ** 0.5 + HP["eps"])
    expected = row0 * (1 - HP["lr"] * HP["weight_decay"]) - move
    torch.testing.assert_close(ours[0].detach(), expected, rtol=0, atol=1e-12)
    per_row_step = row0 * (1 - HP["lr"] * HP["weight_decay"]) - HP["lr"] * grad[0].sign()  # the old semantics
    assert (ours[0].detach() - per_row_step).abs().min() > 0.4 * HP["lr"]
    assert torch.equal(ours[untouched[1:]], before[untouched[1:]])  # rows 2, 3, 5 still untouched


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("width", [(5,), ()])  # a (N, 5) table and an (N,) bias
def test_most_rows_touched_takes_the_in_place_path_with_the_same_result(dtype, width, monkeypatch):
    from monoroute.train import optim as O

    torch.manual_seed(0)
    n = 40
    start = torch.randn(n, *width, dtype=dtype)
    results = []
    for snapshot_from in (2.0, 0.5):  # 2.0: always gather (the reference); 0.5: 36 of 40 rows in place
        monkeypatch.setattr(O, "SNAPSHOT_FROM", snapshot_from)
        table = nn.Parameter(start.clone())
        opt = RowSparseAdamW([table], **HP)
        g = torch.Generator().manual_seed(1)
        for rows in (torch.arange(0, 36), torch.arange(4, 40), torch.tensor([0, 1, 2])):  # many, many, few
            values = torch.randn(rows.numel(), *width, generator=g, dtype=dtype)
            table.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), values, (n, *width), check_invariants=True)
            opt.step()
        state = opt.state[table]
        results.append((table.detach().clone(), state["exp_avg"].clone(), state["exp_avg_sq"].clone()))
    for ours, ref in zip(*results):
        assert torch.equal(ours, ref)  # elementwise AdamW: the same bits on either path
    assert not torch.equal(results[1][0], start)  # control: the table did move


def test_dense_grad_touches_nonzero_rows_only():
    grad = torch.zeros(5, 3)
    grad[2, 1] = 1.0
    grad[4] = -2.0
    rows, values = touched_rows(grad)
    assert rows.tolist() == [2, 4]
    assert torch.equal(values, grad[[2, 4]])
    element_sparse = grad.to_sparse()  # sparse_dim=2: regrouped into rows
    rows, values = touched_rows(element_sparse)
    assert rows.tolist() == [2, 4] and torch.equal(values, grad[[2, 4]])


def test_state_dict_roundtrip_resumes_identically():
    def make_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), RoutedFFN(8, 16, 4, aux_coef=0.0))

    model = make_model()
    x = torch.randn(10, 8)

    def train_step(m, opt):
        opt.zero_grad(set_to_none=True)
        m(x).pow(2).sum().backward()
        opt.step()

    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1, sparse_rows=True)
    for _ in range(2):
        train_step(model, opt)
    resumed = make_model()
    resumed.load_state_dict(model.state_dict())
    resumed_opt = build_optimizer(resumed, lr=1e-2, weight_decay=0.1, sparse_rows=True)
    resumed_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for group in resumed_opt.param_groups:  # the trainer's LR schedule must still reach every part
        group["lr"] = 5e-3
    for group in opt.param_groups:
        group["lr"] = 5e-3
    for _ in range(2):
        train_step(model, opt)
        train_step(resumed, resumed_opt)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    rows_part = resumed_opt.optimizers[1]
    assert all(g["lr"] == 5e-3 for g in rows_part.param_groups)


def test_build_optimizer_groups():
    model = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8), nn.Linear(8, 8), RoutedFFN(8, 16, 4))
    ffn = model[3]
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    by_name = {g["name"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert by_name["decay"] == {id(model[2].weight), id(ffn.w_in), id(ffn.w_out), id(ffn.router.query.weight)}
    assert id(model[0].weight) in by_name["no_decay"] and id(ffn.router.keys) in by_name["no_decay"]
    assert {g["name"]: g["weight_decay"] for g in opt.param_groups} == {"decay": 0.1, "no_decay": 0.0}

    sparse = build_optimizer(model, lr=1e-3, weight_decay=0.1, sparse_rows=True)
    by_name = {g["name"]: {id(p) for p in g["params"]} for g in sparse.param_groups}
    assert by_name["tables_decay"] == {id(ffn.w_in), id(ffn.w_out)}
    assert by_name["tables_no_decay"] == {id(ffn.b_in)}
    assert isinstance(sparse.optimizers[1], RowSparseAdamW)
    n_params = sum(len(g["params"]) for g in sparse.param_groups)
    assert n_params == len(list(model.parameters()))


def test_sparse_grad_layer_requires_sparse_rows():
    ffn = RoutedFFN(8, 16, 4)
    ffn.sparse_grad = True  # what RoutedFFN(sparse_grad=True) sets
    with pytest.raises(MonorouteError, match="sparse_rows=True"):
        build_optimizer(ffn, lr=1e-3, weight_decay=0.1)


def test_clip_mixed_grads_equals_dense():
    g = torch.Generator().manual_seed(3)
    dense_params = [nn.Parameter(torch.zeros(6, 4, dtype=torch.float64)) for _ in range(3)]
    mixed_params = [nn.Parameter(torch.zeros(6, 4, dtype=torch.float64)) for _ in range(3)]
    grads = [torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    grads[1][[0, 3]] = 0
    for p, grad in zip(dense_params, grads):
        p.grad = grad.clone()
    mixed_params[0].grad = grads[0].clone()
    # Uncoalesced: row 1 split into two entries that must add before squaring.
    rows = torch.tensor([[1, 2, 4, 5, 1]])
    values = torch.cat([grads[1][[1, 2, 4, 5]] * torch.tensor([[0.5], [1], [1], [1]], dtype=torch.float64),
                        grads[1][[1]] * 0.5])
    mixed_params[1].grad = torch.sparse_coo_tensor(rows, values, (6, 4), check_invariants=True)
    mixed_params[2].grad = grads[2].to_sparse()
    for max_norm in (1e3, 0.5):
        expected = torch.nn.utils.clip_grad_norm_(dense_params, max_norm)
        total = clip_grad_norm_(mixed_params, max_norm)
        torch.testing.assert_close(total, expected.to(total.dtype))
        for a, b in zip(mixed_params, dense_params):
            torch.testing.assert_close(a.grad.to_dense(), b.grad)


def test_clip_leaves_gradients_bitwise_alone_below_the_norm_and_scales_them_above():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.zeros(5, 3)) for _ in range(2)]
    grads = [torch.randn(5, 3) for _ in range(2)]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    total = clip_grad_norm_(params, 1e3)  # far below: not touched at all
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
    clip_grad_norm_(params, 0.5)  # above: scaled to norm 0.5 (the control that it does clip)
    joint = torch.stack([p.grad.norm() for p in params]).norm()
    torch.testing.assert_close(joint, torch.tensor(0.5), rtol=1e-5, atol=0)
    assert total > 0.5


@pytest.mark.parametrize("sparse_rows", [False, True])
def test_table_lr_mult_scales_only_the_unit_tables(sparse_rows):
    """One AdamW step moves a parameter by ~lr (the first Adam step is lr·sign(g)), so with
    table_lr_mult = 3 the unit tables move 3x as far as the router's query, and with 1 as far."""
    torch.manual_seed(0)
    moved = {}
    for mult in (1.0, 3.0):
        layer = RoutedFFN(8, 16, 4, sparse_grad=sparse_rows, aux_coef=0.0)
        with torch.no_grad():
            layer.b_in.fill_(1.0)  # every selected unit fires, so w_in and w_out both get gradient
        before = {n: p.detach().clone() for n, p in layer.named_parameters()}
        opt = build_optimizer(layer, lr=1e-2, weight_decay=0.0, sparse_rows=sparse_rows, table_lr_mult=mult)
        layer(torch.randn(32, 8)).pow(2).sum().backward()
        opt.step()
        moved[mult] = {n: (p.detach() - before[n]).abs().max().item() for n, p in layer.named_parameters()}
    for name in ("w_in", "w_out"):
        assert moved[1.0][name] == pytest.approx(1e-2, rel=1e-3)
        assert moved[3.0][name] == pytest.approx(3e-2, rel=1e-3)
    assert moved[3.0]["router.query.weight"] == pytest.approx(moved[1.0]["router.query.weight"], rel=1e-6)
    assert moved[1.0]["router.query.weight"] == pytest.approx(1e-2, rel=1e-3)


def test_table_lr_mult_must_be_positive():
    from monoroute.train.config import TrainConfig

    with pytest.raises(MonorouteError, match="table_lr_mult"):
        TrainConfig(table_lr_mult=0.0).check()


def test_state_of_the_per_row_step_version_resumes_at_its_largest_step():
    """Checkpoints written before the fused update hold an (N,) int64 step per row; resuming takes
    the parameter's step as their maximum (the rows touched on every step) and goes on from there."""
    ours, ref = table_pair()
    opt = RowSparseAdamW([ours], **HP)
    ref_opt = torch.optim.AdamW([ref], **HP, fused=True)
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(4)]
    for grad in grads[:3]:
        ours.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        ref_opt.step()
    old = opt.state_dict()
    old["state"][0]["step"] = torch.tensor([3, 3, 1, 3, 2, 3])  # as the old version saved it
    resumed = RowSparseAdamW([ours], **HP)
    resumed.load_state_dict(old)
    assert resumed.state[ours]["step"].dim() == 0 and resumed.state[ours]["step"].item() == 3
    ours.grad, ref.grad = grads[3].clone(), grads[3].clone()
    resumed.step()
    ref_opt.step()
    assert resumed.state[ours]["step"].item() == 4
    assert torch.equal(ours, ref)


def test_coalesced_remarks_sorted_rows_and_sums_repeated_ones():
    values = torch.arange(12, dtype=torch.float64).view(3, 4)
    sorted_rows = torch.sparse_coo_tensor(torch.tensor([[0, 2, 5]]), values, (6, 4), check_invariants=True)
    assert not sorted_rows.is_coalesced()  # as autograd stores a gradient built coalesced
    marked = coalesced(sorted_rows)
    assert marked.is_coalesced() and marked._values().data_ptr() == values.data_ptr()  # no copy
    repeated = torch.sparse_coo_tensor(torch.tensor([[5, 2, 5]]), values, (6, 4), check_invariants=True)
    merged = coalesced(repeated)
    assert merged.is_coalesced() and merged.indices().tolist() == [[2, 5]]
    assert torch.equal(merged.to_dense(), repeated.to_dense())
    assert torch.equal(merged.values()[1], values[0] + values[2])
