"""Circuit discovery: task generators, masks against simple references, a hand-built model whose task
one known unit carries, and the command's bad-input errors."""
import ast
import json

import pytest
import torch

from monoroute.circuits.masks import CircuitMask
from monoroute.circuits.nodes import compute_means, node_groups
from monoroute.circuits.search import (SearchOptions, bisect_circuit, find_circuit, loss_with, make_batch, swap_units,
                                       task_activity, task_loss, with_task_live)
from monoroute.circuits.tasks import TASKS, Task, fact_tasks, select_tasks
from monoroute.data.facts import FactsSpec, FactsWorld
from monoroute.data.tokenizers import ByteTokenizer
from monoroute.errors import MonorouteError
from monoroute.hooks import SparseActivations
from monoroute.models.config import GPTConfig
from monoroute.models.gpt import GPT

from conftest import FAST_TRAIN

TOK = ByteTokenizer()


# --- tasks -----------------------------------------------------------------------------------------

def test_at_least_twelve_tasks_whose_completed_pairs_parse():
    assert len(TASKS) >= 12
    for task in TASKS.values():
        pairs = task.pairs(40, seed=3, max_prompt_bytes=127)
        assert len(pairs) == 40
        for p in pairs:
            assert p.a.answer != p.b.answer
            assert len(p.a.prompt) <= 127 and len(p.b.prompt) <= 127
            for ex in (p.a, p.b):
                ast.parse(ex.text)  # the byte asked for is one that completes valid Python
        # varied: identifiers, values and surroundings change between pairs
        assert len({p.a.prompt for p in pairs}) >= 30, task.name
        # every pair of a task poses the same binary choice
        assert len({(p.a.answer, p.b.answer) for p in pairs}) == 1, task.name


@pytest.mark.parametrize("name", sorted(TASKS) + ["fact_birth_city", "fact_employer"])
def test_the_three_splits_share_no_prompt(name):
    task = TASKS.get(name) or fact_tasks(FactsWorld(FactsSpec.parse("people=30")))[name]
    splits = task.splits(48, 3, seed=0)
    assert [len(s) for s in splits] == [16, 16, 16]
    prompts = [ex.prompt for split in splits for p in split for ex in (p.a, p.b)]
    assert len(prompts) == 96 and len(set(prompts)) == 96  # no prompt twice, within or across the splits
    assert task.splits(48, 3, seed=0) == splits != task.splits(48, 3, seed=1)  # seeded


def test_fact_tasks_differ_only_in_the_person_and_answer_with_their_own_values():
    world = FactsWorld(FactsSpec.parse("people=30"))
    tasks = fact_tasks(world)
    assert sorted(tasks) == sorted(f"fact_{a}" for a in ("birth_month", "birth_year", "birth_city", "university",
                                                         "major", "employer"))
    by_name = {n: i for i, n in enumerate(world.names)}
    for pair in tasks["fact_birth_city"].pairs(20, seed=0):
        for ex in (pair.a, pair.b):
            assert ex.prompt.startswith("\n\n")  # the document separator, as a biography starts in training
            person = next(p for n, p in by_name.items() if n in ex.prompt)
            assert ex.text.endswith(" " + world.value(person, 2) + ".")  # the person's own city, completed
        assert pair.a.answer != pair.b.answer
        name_a = next(n for n in by_name if n in pair.a.prompt)
        name_b = next(n for n in by_name if n in pair.b.prompt)
        assert name_a != name_b and pair.a.prompt.replace(name_a, name_b) == pair.b.prompt  # only the name differs
    for pair in tasks["fact_birth_year"].pairs(20, seed=0):  # years share "19" (or "196"): asked is the first byte after
        year_a, year_b = (ex.text.rsplit(" ", 1)[1].rstrip(".") for ex in (pair.a, pair.b))
        shared = pair.a.prompt.rsplit(" ", 1)[1]
        assert shared == pair.b.prompt.rsplit(" ", 1)[1] and shared.startswith("19") and len(shared) in (2, 3)
        assert year_a[len(shared)] != year_b[len(shared)] and year_a.startswith(shared) and year_b.startswith(shared)
    # the Python tasks are the default of a run on another corpus; fact tasks need a facts world
    assert [t.name for t in select_tasks([], world)] == list(tasks)
    with pytest.raises(MonorouteError, match="fact_\\* tasks need a run trained on a facts corpus"):
        select_tasks(["fact_major"])


def test_tasks_are_seeded_and_fit_a_short_context():
    t = TASKS["dict_vs_list"]
    assert t.pairs(5, seed=1) == t.pairs(5, seed=1) != t.pairs(5, seed=2)
    assert all(len(p.a.prompt) <= 63 and len(p.b.prompt) <= 63 for p in TASKS["set_vs_str"].pairs(20, max_prompt_bytes=63))


def test_unknown_task_names_the_choices():
    with pytest.raises(MonorouteError, match="unknown task 'nope'; choose from quote"):
        select_tasks(["quote", "nope"])


def test_task_loss_is_binary_cross_entropy_at_each_prompts_last_byte():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=1, d_model=16, block_size=64)).eval()
    pairs = TASKS["quote"].pairs(3)
    batch = make_batch(pairs, TOK)
    ref = []
    for p in pairs:  # one prompt at a time, unpadded, in float64
        cand = [ord(p.a.answer), ord(p.b.answer)]
        for label, ex in enumerate((p.a, p.b)):
            logits = model(torch.tensor([TOK.encode(ex.prompt)]))[0][0, -1].double()
            ref.append(-torch.log_softmax(logits[cand], 0)[label])
    assert task_loss(model, batch).item() == pytest.approx(torch.stack(ref).mean().item(), abs=1e-5)


# --- masks against references ----------------------------------------------------------------------

def tiny(ffn: str) -> GPT:
    torch.manual_seed(1)
    cfg = GPTConfig(n_layer=2, n_head=2, d_model=16, block_size=32, ffn=ffn, d_ff=32, n_units=64, k=4, out_bias=True)
    return GPT(cfg).eval()


def windows(n=16, T=32, seed=0):
    return torch.randint(97, 123, (n, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("ffn", ["dense", "routed"])
def test_all_kept_is_the_model_and_all_ablated_is_the_mean_prediction(ffn):
    model = tiny(ffn)
    groups = node_groups(model)
    compute_means(model, groups, windows(256))
    # (a node that never varied in the means pass is ablated even when kept: here every node is live)
    assert all(bool(g.live.all()) for g in groups if "attn" not in g.hook)
    mask = CircuitMask(model, groups)
    x = windows(4, 20, seed=5)
    clean = model(x)[0]
    mask.set_fixed([torch.ones(g.size) for g in groups])
    with model.hooks(mask.hooks()):
        assert torch.allclose(model(x)[0], clean, atol=1e-5)
    mask.set_fixed([torch.zeros(g.size) for g in groups])
    with model.hooks(mask.hooks()):
        ablated = model(x)[0]
    ln_f = next(g for g in groups if g.hook == "ln_f.hook_normalized")
    # every node at its mean: the logits are the unembedding of ln_f's mean output, at every position
    mean_prediction = model.lm_head(ln_f.mean)
    assert torch.allclose(ablated, mean_prediction.expand_as(ablated), atol=1e-5)
    assert not torch.allclose(clean, clean[:, :1])  # the clean model does depend on its input


def test_routed_unit_mask_equals_ablating_the_unit_and_adding_its_mean_contribution():
    model = tiny("routed")
    groups = node_groups(model)
    x = windows(3, 32, seed=7)
    # Means over windows that include x: every unit that fires on x is live (the mask always ablates
    # a non-live unit, which the reference below would not).
    compute_means(model, groups, torch.cat([windows(), x]))
    gi = next(i for i, g in enumerate(groups) if g.hook == "blocks.1.mlp.hook_post")
    g = groups[gi]
    unit = int(torch.nonzero(g.live)[0])
    keep = [torch.ones(h.size) for h in groups]
    keep[gi][unit] = 0.0
    mask = CircuitMask(model, groups)
    mask.set_fixed(keep)
    with model.hooks(mask.hooks()):
        masked = model(x)[0]
    w_out = model.blocks[1].mlp.w_out
    hooks = [("blocks.1.mlp.hook_post", lambda act, hook: act.ablate([unit])),
             ("blocks.1.hook_mlp_out", lambda act, hook: act + g.mean[unit] * w_out[unit])]
    with model.hooks(hooks):
        reference = model(x)[0]
    assert torch.allclose(masked, reference, atol=1e-5)
    assert not torch.allclose(masked, model(x)[0], atol=1e-4)  # the unit mattered somewhere


def test_routed_unit_means_count_unselected_tokens_as_zero():
    model = tiny("routed")
    groups = node_groups(model)
    w = windows()
    compute_means(model, groups, w)
    g = next(g for g in groups if g.hook == "blocks.0.mlp.hook_post")
    acts = model.run_with_cache(w, names_filter=[g.hook])[1][g.hook]
    assert isinstance(acts, SparseActivations)
    assert torch.allclose(g.mean, acts.to_dense().reshape(-1, g.size).mean(0), atol=1e-6)
    assert torch.equal(g.live, (acts.to_dense().reshape(-1, g.size) != 0).any(0))


# --- a hand-built model: unit 0 alone carries the task ---------------------------------------------

def hand_built() -> GPT:
    """One block, d 8, four neurons. Token 'b' writes +(e0 - e1), 'c' writes -(e0 - e1), 'a' writes
    e6 - e7; every token also writes the constant e4 - e5. Attention is zeroed. Neuron 0 reads e0 - e1
    and writes e2 - e3; the unembedding reads e2 - e3 for 'x' and the constant channel for 'y', so
    after 'b' the model says 'x' and after 'c' 'y' through neuron 0 alone. Neuron 1 reads 'a'
    (e6 - e7) and neuron 2 reads e0 - e1 too; both write a little into e6 - e7, which the unembedding
    ignores (it only rescales the LayerNorm)."""
    cfg = GPTConfig(n_layer=1, n_head=1, d_model=8, block_size=16, ffn="dense", d_ff=4, tie_weights=False)
    model = GPT(cfg)
    e = torch.eye(8)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for ln in (model.blocks[0].ln_1, model.blocks[0].ln_2, model.ln_f):
            ln.weight.fill_(1.0)
        const = e[4] - e[5]
        model.wte.weight[:] = const
        model.wte.weight[ord("a")] = const + e[6] - e[7]
        model.wte.weight[ord("b")] = const + e[0] - e[1]
        model.wte.weight[ord("c")] = const - e[0] + e[1]
        mlp = model.blocks[0].mlp
        mlp.up.weight[0] = 2 * (e[0] - e[1])
        mlp.up.weight[1] = 2 * (e[6] - e[7])
        mlp.up.weight[2] = 2 * (e[0] - e[1])
        mlp.down.weight[:, 0] = e[2] - e[3]
        mlp.down.weight[:, 1] = 0.1 * (e[6] - e[7])  # small writes: live units of (almost) no effect
        mlp.down.weight[:, 2] = 0.1 * (e[6] - e[7])
        model.lm_head.weight[ord("x")] = e[2] - e[3]
        model.lm_head.weight[ord("y")] = e[4] - e[5]
    return model.eval()


def hand_task() -> Task:
    import random

    def make(rng: random.Random):
        pre = "".join(rng.choice("abc") for _ in range(rng.randint(2, 9)))
        return pre + "b", "x", pre + "c", "y"

    return Task("b_or_c", "x after b, y after c", make, preamble=False, python=False)


def hand_setup():
    model = hand_built()
    groups = node_groups(model)
    compute_means(model, groups, torch.tensor([[ord(c) for c in "abcacbbacabcabca"]] * 4))
    learn, choose, report = (make_batch(s, TOK) for s in hand_task().splits(36, 3, seed=0, max_prompt_bytes=15))
    return model, groups, learn, choose, report


def test_search_keeps_the_one_unit_that_carries_the_task_and_little_else():
    model, groups, learn, choose, report = hand_setup()
    assert task_loss(model, report).item() < 0.1  # the full model does the task
    active = task_activity(model, groups, [learn, choose, report])
    units = next(i for i, g in enumerate(groups) if g.kind == "units")
    # neuron 0 fires after 'b', 1 after 'a', 2 after 'b'; neuron 3 reads nothing (GELU(0) = 0): never active
    assert active[units].tolist() == [True, True, True, False]
    out = find_circuit(model, groups, learn, choose, report, SearchOptions(steps=150, target_loss=0.15), active)
    assert all(p.requires_grad for p in model.parameters())  # only the masks learned; the model is as it was
    assert out["circuit"].get("blocks.0.mlp.hook_post") == [0]
    assert out["nodes"]["units"] == 1 and out["reached"]
    assert out["nodes"]["attention"] == 0  # attention is zeroed: its channels are constant, never live
    live = out["live"]["total"]
    assert out["nodes"]["total"] <= 8 < live  # a handful of residual channels around the unit, of many live nodes
    assert out["circuit_loss_choose"] <= 0.15 and out["circuit_loss"] <= 0.15  # chosen on one split, holds on another
    assert out["necessity_loss"] > 0.6  # without the circuit the model is at (or below) chance
    # unit-level checks: unit 0 alone ablated (everything else kept) loses the task; swapped for an active
    # unit (1 or 2, which write nothing the unembedding reads) the circuit misses the target
    assert out["units_checked"] and out["passes_unit_necessity"] and out["passes_unit_control"] and out["passes"]
    assert out["unit_necessity_loss"] > 0.6 and out["unit_control_loss"] > 0.6 and out["unit_control_drawn"] == 1
    mask = CircuitMask(model, groups)
    only_unit0 = [torch.ones(g.size) for g in groups]
    only_unit0[units] = torch.tensor([1.0, 0, 0, 0])
    assert loss_with(model, mask, only_unit0, report) < 0.1  # the other units are not needed at all


def test_the_unit_control_draws_only_task_active_units_other_than_the_circuits():
    model, groups, learn, choose, report = hand_setup()
    active = task_activity(model, groups, [learn, choose, report])
    units = next(i for i, g in enumerate(groups) if g.kind == "units")
    keep = [torch.ones(g.size) for g in groups]
    keep[units] = torch.tensor([1.0, 0, 0, 0])
    drawn = set()
    for seed in range(40):
        swapped = swap_units(groups, keep, active, torch.Generator().manual_seed(seed))
        assert all(torch.equal(a, b) for i, (a, b) in enumerate(zip(swapped, keep)) if i != units)  # only units move
        assert swapped[units].sum() == 1  # as many as the circuit had
        drawn |= set(torch.nonzero(swapped[units]).flatten().tolist())
    assert drawn == {1, 2}  # never the circuit's own unit 0, never the inactive unit 3
    # a circuit with two units where only one other is active: the control holds what exists
    keep[units] = torch.tensor([1.0, 1.0, 0, 0])
    assert torch.equal(swap_units(groups, keep, active, torch.Generator())[units], torch.tensor([0.0, 0, 1, 0]))


def test_an_unreachable_target_is_reported_not_reached():
    model, groups, learn, choose, report = hand_setup()
    mask = CircuitMask(model, groups)
    everything = loss_with(model, mask, [torch.ones(g.size) for g in groups], choose)
    keep, loss, _, reached = bisect_circuit(model, mask, choose, everything / 10)  # below what every node gives
    assert not reached and loss > everything / 10
    assert sum(int((k * g.live).sum()) for k, g in zip(keep, groups)) == sum(int(g.live.sum()) for g in groups)
    keep, loss, _, reached = bisect_circuit(model, mask, choose, 0.15)
    assert reached and loss <= 0.15


def test_a_task_the_model_cannot_do_is_left_out_of_the_means(monkeypatch):
    import random

    from monoroute.circuits import run as circuits_run

    def make(rng: random.Random):  # the same prompt shape, but which answer is right is a coin flip
        pre = "".join(rng.choice("abc") for _ in range(rng.randint(2, 9)))
        return (pre + "b", "x", pre + "bb", "y") if rng.random() < 0.5 else (pre + "b", "y", pre + "bb", "x")

    coin = Task("coin", "no model can do this", make, preamble=False, python=False)
    model, groups, *_ = hand_setup()
    opts = circuits_run.CircuitOptions(pairs=24, search_seeds=2, steps=20)
    rows = [circuits_run.task_circuits(model, TOK, groups, t, SearchOptions(steps=20), opts) for t in (coin, hand_task())]
    assert rows[0]["status"] == "cannot_do" and rows[0]["all_kept_loss_choose"] > 0.15 and "seeds" not in rows[0]
    assert rows[1]["status"] == "ok" and rows[1]["units_median"] == 1 and len(rows[1]["seeds"]) == 2
    summary = circuits_run.summarise(rows, opts)
    assert summary["tasks_done"] == 1 and summary["tasks_cannot_do"] == ["coin"]
    assert summary["geomean_units"] == 1.0  # the means hold only the task the model can do


def test_a_routed_unit_that_fires_on_the_task_but_not_in_the_means_pass_is_maskable():
    model = tiny("routed")
    groups = node_groups(model)
    compute_means(model, groups, windows(2, 8))  # a short means pass: many units never fire there
    pairs = TASKS["quote"].splits(12, 3, seed=0, max_prompt_bytes=31)
    batches = [make_batch(s, TOK) for s in pairs]
    active = task_activity(model, groups, batches)
    task_groups = with_task_live(groups, active)
    gi = next(i for i, g in enumerate(groups) if g.routed)
    newly = active[gi] & ~groups[gi].live
    assert newly.any()  # units the means pass never saw fire on the task's prompts ...
    assert torch.equal(task_groups[gi].live, groups[gi].live | active[gi]) and bool(task_groups[gi].live[newly].all())
    assert float(task_groups[gi].mean[newly].abs().max()) == 0.0  # ... and their ablation value is what it measured: 0
    ones = [torch.ones(g.size) for g in groups]
    clean = task_loss(model, batches[1]).item()
    # every node kept through the masks is the model on the task only once those units are maskable
    assert loss_with(model, CircuitMask(model, task_groups), ones, batches[1]) == pytest.approx(clean, abs=1e-5)
    assert loss_with(model, CircuitMask(model, groups), ones, batches[1]) != pytest.approx(clean, abs=1e-5)
    # and such a unit is maskable: kept, it acts; ablated, the output moves
    keep = [torch.ones(g.size) for g in groups]
    keep[gi] = (~newly).float()
    assert loss_with(model, CircuitMask(model, task_groups), keep, batches[1]) != pytest.approx(clean, abs=1e-6)


# --- the command -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from monoroute.cli import main

    run = tmp_path_factory.mktemp("circ") / "dense"
    assert main(["train", "--preset", "tiny", "--ffn", "dense", "--out", str(run), *FAST_TRAIN]) == 0
    return run


def test_cli_writes_json_csv_and_html(tiny_run, capsys):
    from monoroute.cli import main

    # a barely trained model cannot do most tasks: a target at 0.69 lets the search run anyway
    assert main(["circuits", str(tiny_run), "--tasks", "quote,bracket_type", "--target-loss", "0.69", "--steps", "5",
                 "--pairs", "8", "--mean-tokens", "1024", "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    out = tiny_run / "circuits"
    report = json.loads((out / "circuits.json").read_text())
    assert [t["task"] for t in report["tasks"]] == ["quote", "bracket_type"]
    assert summary["tasks_done"] + len(summary["tasks_cannot_do"]) + len(summary["tasks_fail_checks"]) == 2
    # the reported full-model losses are the model's on the report split (the third of 8 pairs' splits)
    from monoroute.train.trainer import load

    loaded = load(tiny_run)
    for row in report["tasks"]:
        task = select_tasks([row["task"]])[0]
        learn, choose, held = task.splits(8, 3, seed=0, max_prompt_bytes=loaded.model.cfg.block_size - 1)
        with torch.no_grad():
            assert row["full_loss"] == pytest.approx(task_loss(loaded.model, make_batch(held, TOK)).item(), abs=1e-5)
            assert row["full_loss_choose"] == pytest.approx(task_loss(loaded.model, make_batch(choose, TOK)).item(),
                                                            abs=1e-5)
        assert row["all_kept_loss_choose"] == pytest.approx(row["full_loss_choose"], abs=1e-5)
        if row["status"] != "cannot_do":
            assert len(row["seeds"]) == 3 and row["units_min"] <= row["units_median"] <= row["units_max"]
    csv_lines = (out / "circuits.csv").read_text().splitlines()
    assert csv_lines[0].startswith("task,status,full_loss") and len(csv_lines) == 3
    for line, row in zip(csv_lines[1:], report["tasks"]):  # the CSV holds the JSON's numbers
        cells = line.split(",")
        assert cells[:2] == [row["task"], row["status"]] and float(cells[2]) == pytest.approx(row["full_loss"], abs=1e-4)
    assert "<h2>Circuits" in (out / "report.html").read_text()
    # --out keeps another target's results apart, leaving RUN/circuits as it was
    before = (out / "circuits.json").read_text()
    other = tiny_run / "circuits-strict"
    assert main(["circuits", str(tiny_run), "--tasks", "quote", "--target-loss", "0.01", "--steps", "5", "--pairs", "8",
                 "--mean-tokens", "1024", "--no-progress", "--out", str(other)]) == 0
    capsys.readouterr()
    assert json.loads((other / "circuits.json").read_text())["target_loss"] == 0.01
    assert (out / "circuits.json").read_text() == before


@pytest.mark.parametrize("args, message", [
    (["--tasks", "quote,nope"], "unknown task 'nope'"),
    (["--target-loss", "0"], "--target-loss must be in (0, 0.693)"),
    (["--target-loss", "-1"], "--target-loss must be in (0, 0.693)"),
    (["--lr", "-1"], "--lr must be a finite number > 0"),
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--lam", "-1"], "--lam must be a finite number >= 0"),
    (["--pairs", "1000000000"], "--pairs must be between 6"),
    (["--pairs", "5"], "--pairs must be between 6"),
    (["--search-seeds", "0"], "--search-seeds must be between 1 and 100"),
    (["--steps", "0"], "--steps must be between 1"),
    (["--mean-tokens", "100000000000"], "--mean-tokens must be between 1"),
])
def test_bad_input_is_one_clear_error_line(tiny_run, capsys, args, message):
    from monoroute.cli import main

    assert main(["circuits", str(tiny_run), *args, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err and err.startswith("monoroute: error:")


def test_run_without_checkpoint_is_one_clear_error_line(tmp_path, capsys):
    from monoroute.cli import main

    (tmp_path / "config.json").write_text("{}")
    assert main(["circuits", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has no checkpoint" in err
    assert main(["circuits", str(tmp_path / "missing"), "--no-progress"]) == 2
    assert "missing" in capsys.readouterr().err


def test_an_unwritable_output_fails_in_one_line_before_any_work(tiny_run, tmp_path, capsys, monkeypatch):
    """As root a chmod does not stop writes, so the unwritable place is a path under a regular file."""
    from monoroute.cli import main
    import monoroute.train.trainer as trainer

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setattr(trainer, "load", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    assert main(["circuits", str(tiny_run), "--tasks", "quote", "--out", str(blocker / "sub"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("monoroute: error: cannot write the circuits to")
