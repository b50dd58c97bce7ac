"""What a stage trains: freezing by module path (the shipped stage files' exact parameter sets)
and the stage's contrastive loss (softmax / sigmoid reaching the loss op, so SigLIP's logit_bias
learns)."""
from __future__ import annotations

import pytest
import torch

from regionmed_fast.model import RegionMedCLIP
from regionmed_fast.model.factory import model_config
from regionmed_fast.train.freeze import apply_freeze
from regionmed_fast.train.stages import StageFileError, builtin_config, load_run, parse_run
from train_helpers import MODEL_ARGS, run_dict


def _meta_model(cfg) -> RegionMedCLIP:
    """The stage file's model, on the meta device (names and shapes, no memory, no weights)."""
    kw = dict(cfg.model_args)
    if cfg.baseline == "global":
        kw["use_roi"] = False
    with torch.device("meta"):
        return RegionMedCLIP(model_config(cfg.model, **kw), load_text_weights=False)


@pytest.mark.parametrize("name", ["demo", "progressive", "global"])
def test_shipped_stage_files_train_exactly_these_parameters(name):
    cfg = load_run(builtin_config(name))
    model = _meta_model(cfg)
    names = [n for n, _ in model.named_parameters()]
    tops = {n.split(".")[0] for n in names}
    assert {"visual", "text", "text_proj", "image_proj", "logit_scale"} <= tops
    assert ("roi" in tops) == (cfg.baseline != "global")
    for stage in cfg.stages:
        trained = set(apply_freeze(model, stage.frozen, stage=stage.name,
                                   missing_ok=("roi",) if cfg.baseline else ()))
        if name == "demo":  # frozen: [text]: the text tower only; its projection trains
            assert stage.frozen == ["text"]
            assert trained == {n for n in names if not n.startswith("text.")}
            assert "text_proj.weight" in trained
        else:
            assert stage.frozen == [] and trained == set(names)
        assert trained == {n for n, p in model.named_parameters() if p.requires_grad}


def test_frozen_entries_are_module_paths_or_parameter_names():
    cfg = parse_run(run_dict())
    with torch.device("meta"):
        model = RegionMedCLIP(model_config(cfg.model, **MODEL_ARGS), load_text_weights=False)
    names = [n for n, _ in model.named_parameters()]
    blocks0 = {n for n in names if n.startswith("visual.blocks.0.")}
    assert blocks0
    trained = set(apply_freeze(model, ["visual.blocks.0", "logit_scale"]))
    assert trained == set(names) - blocks0 - {"logit_scale"}
    # a prefix that is not a module path is refused, not matched as a string
    for bad in ("tex", "visual.block", "text_pro"):
        with pytest.raises(StageFileError, match=f"frozen entry '{bad}' is no module path"):
            apply_freeze(model, [bad], stage="s")


def test_stage_loss_kind_is_validated():
    ok = parse_run(run_dict(stages=[{"name": "a", "steps": 1, "losses": {"global": 1},
                                     "loss": "sigmoid"}]))
    assert ok.stages[0].loss == "sigmoid" and parse_run(run_dict()).stages[0].loss == "softmax"
    with pytest.raises(StageFileError, match="loss must be one of"):
        parse_run({"stages": [{"name": "a", "steps": 1, "losses": {"global": 1}, "loss": "siglip"}]})
    with pytest.raises(StageFileError, match="softmax loss only"):
        parse_run({"stages": [{"name": "a", "steps": 1, "losses": {"global": 1}, "loss": "sigmoid",
                               "hard_negative_beta": 0.5}]})


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> str:
    from regionmed_fast.data.synthetic import write_dataset

    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, n=64, size=32, seed=0)
    return str(root)


def _train(tmp_path, synth, loss: str, steps: int = 2):
    from regionmed_fast.train.trainer import Trainer

    cfg = parse_run(run_dict(model_args={**MODEL_ARGS, "init_logit_bias": -10.0}, num_workers=0,
                             save_every=100, stages=[
        {"name": "s", "steps": steps, "losses": {"global": 1.0, "region": 1.0}, "loss": loss,
         "frozen": ["text"], "warmup": 0}]))
    tr = Trainer(cfg, synth, str(tmp_path / loss), progress=False, verbose=False, tensorboard=False)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.fit()
    return before, {n: p.detach() for n, p in tr.model.named_parameters()}


def test_sigmoid_stage_trains_logit_bias_softmax_does_not(tmp_path, synth):
    from regionmed_fast.data.batch import build_batch
    from regionmed_fast.data.manifest import read_manifest
    from regionmed_fast.train.losses import compute_losses
    from regionmed_fast.train.trainer import build_model

    cfg = parse_run(run_dict(model_args={**MODEL_ARGS, "init_logit_bias": -10.0}))
    model, tok = build_model(cfg)
    batch = build_batch(read_manifest(synth)[:8], image_size=32, tokenizer=tok)
    grads = {}
    for kind in ("softmax", "sigmoid"):
        stage = parse_run(run_dict(stages=[{"name": "s", "steps": 1, "loss": kind,
                                            "losses": {"global": 1.0, "region": 1.0}}])).stages[0]
        model.zero_grad(set_to_none=True)
        loss, _ = compute_losses(model(batch), batch, stage)
        loss.backward()
        grads[kind] = float(model.logit_bias.grad)
    assert grads["softmax"] == 0.0  # a softmax is blind to a shift of every logit
    assert abs(grads["sigmoid"]) > 1e-4, grads
    # through the trainer: a sigmoid run moves the bias, a softmax run leaves it where it was
    before, after = _train(tmp_path, synth, "sigmoid")
    assert float(after["logit_bias"]) != float(before["logit_bias"])
    # frozen: [text] kept the text tower and trained its projection
    assert all(torch.equal(after[n], before[n]) for n in before if n.startswith("text."))
    assert not torch.equal(after["text_proj.weight"], before["text_proj.weight"])
    before, after = _train(tmp_path, synth, "softmax")
    assert float(after["logit_bias"]) == float(before["logit_bias"])
