"""carv's guidance as threestudio builds, updates and logs it, without threestudio installed.

The fixture ``threestudio`` below is a minimal threestudio written from the semantics of its source
(threestudio-project/threestudio at 28d9d80: ``threestudio/__init__.py``'s ``register``/``find``,
``threestudio/utils/base.py``'s ``Updateable`` / ``BaseObject`` and ``utils/config.py``'s ``parse_structured``):

- ``BaseObject.__init__(cfg)`` calls ``super().__init__()`` first, then ``cfg = OmegaConf.structured(Config(**cfg))``
  (so an unknown key is a TypeError), ``device = get_device()``, ``configure()``;
- ``Updateable.do_update_step`` visits every public attribute that is an ``Updateable`` (recursively), then calls
  ``self.update_step``; ``Updateable.update_step`` does nothing;
- systems (a ``LightningModule`` that is also ``Updateable``) build the guidance in ``on_fit_start``, call
  ``do_update_step`` at every batch start and pass every entry of the guidance's output to ``self.log``.

The Lightning test runs a real ``lightning.Trainer`` for two steps. ``benchmarks/threestudio_check.py`` runs the
same inside a real threestudio checkout.
"""

import re
import sys
import types
import warnings
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
OmegaConf = pytest.importorskip("omegaconf").OmegaConf


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models run fastest on one thread on a shared machine."""


def make_threestudio() -> types.ModuleType:
    """A module with threestudio's registry and base classes (written from their documented semantics)."""
    ts = types.ModuleType("threestudio")
    ts.__modules__ = {}

    def register(name):
        def decorator(cls):
            if name in ts.__modules__:
                raise ValueError(f"Module {name} already exists! Names of extensions conflict!")
            ts.__modules__[name] = cls
            return cls

        return decorator

    ts.register, ts.find = register, lambda name: ts.__modules__[name]

    def parse_structured(fields, cfg=None):
        return OmegaConf.structured(fields(**cfg))

    class Updateable:
        def do_update_step(self, epoch, global_step, on_load_weights=False):
            for attr in self.__dir__():
                if attr.startswith("_"):
                    continue
                try:
                    module = getattr(self, attr)
                except Exception:  # noqa: BLE001 - threestudio skips attributes it cannot read
                    continue
                if isinstance(module, Updateable):
                    module.do_update_step(epoch, global_step, on_load_weights=on_load_weights)
            self.update_step(epoch, global_step, on_load_weights=on_load_weights)

        def update_step(self, epoch, global_step, on_load_weights=False):
            pass

    class BaseObject(Updateable):
        @dataclass
        class Config:
            pass

        def __init__(self, cfg=None, *args, **kwargs):
            super().__init__()
            self.cfg = parse_structured(self.Config, cfg)
            self.device = torch.device("cpu")  # threestudio's get_device(), on this machine
            self.configure(*args, **kwargs)

        def configure(self, *args, **kwargs):
            pass

    utils = types.ModuleType("threestudio.utils")
    base = types.ModuleType("threestudio.utils.base")
    base.Updateable, base.BaseObject, base.parse_structured = Updateable, BaseObject, parse_structured
    ts.utils, utils.base = utils, base
    return ts


@pytest.fixture
def threestudio(monkeypatch):
    ts = make_threestudio()
    for name, mod in (("threestudio", ts), ("threestudio.utils", ts.utils), ("threestudio.utils.base", ts.utils.base)):
        monkeypatch.setitem(sys.modules, name, mod)
    return ts


def guidance_cfg(path, **extra):
    """A threestudio ``system.guidance`` block (as OmegaConf holds it) for the tiny pipeline."""
    return OmegaConf.create({"pretrained_model_name_or_path": str(path), "half_precision_weights": False,
                             "guidance_scale": 100.0, "max_step_percent": [0, 0.98, 0.5, 100], "image_size": 64,
                             **extra})


def test_the_replica_dispatches_like_threestudio(threestudio):
    """The fixture's own semantics: update_step reaches a subclass's override, and a mixin placed after
    BaseObject is shadowed by Updateable's empty update_step (the trap carv's class must avoid)."""
    Updateable, BaseObject = threestudio.utils.base.Updateable, threestudio.utils.base.BaseObject

    class Mixin:
        calls: list

        def update_step(self, epoch, global_step, on_load_weights=False):
            self.calls.append(global_step)

    class Own(BaseObject):
        def configure(self):
            self.calls = []

        def update_step(self, epoch, global_step, on_load_weights=False):
            self.calls.append(global_step)

    class Shadowed(BaseObject, Mixin):
        def configure(self):
            self.calls = []

    class Holder(Updateable):
        def __init__(self):
            self.own, self.shadowed = Own({}), Shadowed({})

    h = Holder()
    h.do_update_step(0, 7)
    assert h.own.calls == [7] and h.shadowed.calls == []


def test_registered_guidance_builds_from_threestudio_config(threestudio, tiny_sd_path):
    """Item 1: threestudio's BaseObject init order builds the guidance from its config, loading the teacher once,
    from cfg.pretrained_model_name_or_path (no default model load: HF_HUB_OFFLINE=1 would make that an OSError)."""
    from carv.integrations.threestudio import REGISTRY_NAME, CarvGuidance, register

    cls = register()
    assert threestudio.find(REGISTRY_NAME) is cls and register() is cls  # a second call is harmless
    g = cls(guidance_cfg(tiny_sd_path, K=2))
    assert isinstance(g, threestudio.utils.base.Updateable) and isinstance(g, CarvGuidance)
    assert g.device == torch.device("cpu") and g.K == 2 and g.config.guidance_scale == 100.0
    assert OmegaConf.is_config(g.cfg) and g.cfg.K == 2  # threestudio's systems read guidance.cfg
    assert g.teacher.unet.config.sample_size == 8  # the tiny pipeline's UNet, not a default model
    # a misspelt key: one line naming it, the nearest key and the allowed ones (not threestudio's Config TypeError)
    with pytest.raises(ValueError, match=r"^cfg: unknown key\(s\) \['guidance_scal'\] \('guidance_scal': did you "
                                         r"mean 'guidance_scale'\?\); allowed: \[.*'guidance_scale'.*\]$"):
        cls(guidance_cfg(tiny_sd_path, guidance_scal=1.0))


def test_update_step_is_dispatched_by_do_update_step(threestudio, tiny_sd_path):
    """Item 2: a system's do_update_step reaches carv's update_step: the max_step_percent schedule
    [0, 0.98, 0.5, 100] gives max_step 980 -> 740 at step 50 -> 500 at step 100, in the sampler too."""
    from carv.integrations.threestudio import register

    class System(threestudio.utils.base.Updateable):
        def __init__(self, guidance):
            self.guidance = guidance

    system = System(register()(guidance_cfg(tiny_sd_path, grad_clip=[0, 0.5, 2.0, 100])))
    g = system.guidance
    assert (g.min_step, g.max_step) == (20, 980)
    system.do_update_step(0, 50)
    assert g.max_step == 740 and g.sds.sampler.t_max == 740 and g.grad_clip_val == pytest.approx(1.25)
    system.do_update_step(0, 100)
    assert g.max_step == 500 and g.sds.sampler.t_max == 500 and g.grad_clip_val == pytest.approx(2.0)


def test_every_output_goes_through_lightning_log_in_a_real_trainer(threestudio, tiny_sd_path):
    """Item 3: a threestudio-shaped system (LightningModule + Updateable, guidance built in on_fit_start,
    do_update_step at each batch start) logs every entry of the guidance's output with self.log, as
    threestudio's magic3d / latentnerf / sjc / textmesh systems do, for two steps of a real Trainer at K = 2
    with the learned proposal and auto_k (between / within measured), and at K = 1."""
    lightning = pytest.importorskip("lightning")
    from carv.integrations.threestudio import register
    from carv.teachers import DiffusersTeacher

    cls = register()
    Updateable = threestudio.utils.base.Updateable
    prompt_utils = DiffusersTeacher.from_pretrained(str(tiny_sd_path)).encode_prompt("a red mushroom")

    class System(lightning.LightningModule, Updateable):
        def __init__(self, cfg):
            super().__init__()
            self.guidance_cfg = cfg
            self.colour = torch.nn.Parameter(torch.zeros(2, 16, 16, 3))

        def on_fit_start(self):
            self.guidance = cls(self.guidance_cfg)

        def on_train_batch_start(self, batch, batch_idx):
            self.do_update_step(self.current_epoch, self.global_step)

        def training_step(self, batch, batch_idx):
            el, az, dist = batch[0], batch[1], torch.full((2,), 3.0)
            out = self.guidance(torch.sigmoid(self.colour), prompt_utils, el, az, dist)
            loss = 0.0
            for name, value in out.items():
                self.log(f"train/{name}", value)
                if name.startswith("loss_"):
                    loss = loss + value
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    views = torch.utils.data.TensorDataset(torch.tensor([[10.0, 30.0]] * 4), torch.tensor([[0.0, 140.0]] * 4))
    for extra, measured in (({"K": 2, "auto_k": True, "probe_every": 1, "choose_every": 1}, True),
                            ({"K": 1, "proposal": "none", "stratify": "none"}, False)):
        system = System(guidance_cfg(tiny_sd_path, nan_policy="skip", **extra))
        trainer = lightning.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                                    enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(system, torch.utils.data.DataLoader(views, batch_size=None))
        logged = trainer.callback_metrics
        assert {"train/loss_sds", "train/grad_norm", "train/min_step", "train/max_step", "train/K", "train/R",
                "train/skipped"} <= set(logged)
        assert ("train/between" in logged) == ("train/within" in logged) == measured
        # with auto_k the accountant's measured costs are logged too (numbers only), never as a loss_* key
        assert ("train/accounting_cost_ratio" in logged) == measured
        assert not any(k.startswith("train/loss_") and k != "train/loss_sds" for k in logged)
        assert float(logged["train/max_step"]) == 975.0  # [0, 0.98, 0.5, 100] at global step 1: 0.9752
        assert system.guidance.steps == 1 and float(logged["train/R"]) == 2.0
        assert system.colour.grad is not None and system.guidance.last_output.draws.t.shape[0] == 2


def test_every_key_of_threestudios_guidance_configs_is_accepted(threestudio, tiny_sd_path):
    """Item 4: the guidance blocks of threestudio's configs/*.yaml (hifa.yaml, sjc.yaml, the unified, VSD,
    zero123, ControlNet and SDI ones) build; ignored features warn once, honoured keys are honoured."""
    from carv.integrations import threestudio as ts_carv

    hifa = {"weighting_strategy": "sds", "min_step_percent": 0.3, "max_step_percent": 0.98, "sqrt_anneal": True,
            "use_img_loss": True, "trainer_max_steps": 10000}
    sjc = {"use_sjc": True, "var_red": True, "min_step_percent": 0.01, "max_step_percent": 0.97,
           "grad_clip": [0, 0.5, 2.0, 5000], "enable_memory_efficient_attention": True,
           "enable_sequential_cpu_offload": False, "enable_attention_slicing": True,
           "enable_channels_last_format": True, "token_merging": False, "token_merging_params": {"ratio": 0.5},
           "max_items_eval": 4, "view_dependent_prompting": False, "weighting_strategy": "dreamfusion"}
    others = {"guidance_type": "sds", "vsd_phi_model_name_or_path": None, "vsd_use_camera_condition": False,
              "return_rgb_1step_orig": True, "pretrained_model_name_or_path_lora": "stabilityai/stable-diffusion-2-1",
              "cond_image_path": "load/images/hamburger_rgba.png", "cond_elevation_deg": 0.0,
              "cond_azimuth_deg": 0.0, "cond_camera_distance": 3.8, "pretrained_config": "x.yaml", "vram_O": True,
              "control_type": "normal", "condition_scale": 1.0, "fixed_size": 512, "enable_sdi": True,
              "inversion_guidance_scale": -7.5, "inversion_n_steps": 10, "inversion_eta": 0.3, "t_anneal": True}
    assert set(others) | {"use_img_loss", "use_sjc", "var_red", "token_merging", "token_merging_params",
                          "enable_sequential_cpu_offload", "max_items_eval"} == set(ts_carv.IGNORED_KEYS)
    cls = ts_carv.register()
    ts_carv.WARNED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g = cls(guidance_cfg(tiny_sd_path, **hifa))
        cls(guidance_cfg(tiny_sd_path, **hifa))  # a second guidance: no second warning
    assert [str(w.message).split("=")[0] for w in caught] == ["use_img_loss"]
    # HiFA's sqrt anneal: min = max = (0.98 - 0.3) (1 - sqrt(2500 / 10000)) + 0.3 = 0.64 -> t = 640 only
    g.update_step(0, 2500)
    assert (g.min_step, g.max_step) == (640, 640)
    el, az = torch.tensor([10.0, 20.0]), torch.tensor([0.0, 90.0])
    pu = g.teacher.encode_prompt("a cat")
    g(torch.rand(2, 16, 16, 3), pu, el, az, torch.full((2,), 3.0))
    assert (g.last_output.draws.t == 640).all()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g = cls(guidance_cfg(tiny_sd_path, **sjc))
        cls(guidance_cfg(tiny_sd_path, **others))
    warned = {str(w.message).split("=")[0] for w in caught}
    assert warned == {"use_sjc", "token_merging_params", "return_rgb_1step_orig", "pretrained_model_name_or_path_lora",
                      "cond_image_path", "cond_elevation_deg", "cond_azimuth_deg", "cond_camera_distance",
                      "pretrained_config", "control_type", "condition_scale", "fixed_size", "enable_sdi",
                      "inversion_guidance_scale", "inversion_n_steps", "inversion_eta", "t_anneal"}
    assert g.teacher.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert g.weighting == "sds" and g.config.view_dependent_prompting is False
    with pytest.raises(ValueError, match="weighting_strategy"):
        cls(guidance_cfg(tiny_sd_path, weighting_strategy="sdss"))


def test_piecewise_schedules_follow_threestudio(threestudio, tiny_sd_path):
    """Item 4: an 8-entry schedule [start_step, v0, v1, step1, v2, step2, v3, step3] moves linearly between its
    points, as threestudio's C(): 0.98 at 0, 0.7 at 1000, 0.5 at 2000, 0.3 from 3000 on."""
    from carv.integrations.threestudio import register
    from carv.timesteps import scheduled_value

    spec = [0, 0.98, 0.7, 1000, 0.5, 2000, 0.3, 3000]
    want = {0: 0.98, 500: 0.84, 1000: 0.7, 1500: 0.6, 2000: 0.5, 2500: 0.4, 3000: 0.3, 9000: 0.3}
    for step, value in want.items():
        assert scheduled_value(spec, step) == pytest.approx(value)
    assert scheduled_value([0, 1.0, 0.5, 100, 0.0, 200, 9], 150) == pytest.approx(0.25)  # trailing entry unused
    g = register()(guidance_cfg(tiny_sd_path, max_step_percent=spec))
    g.update_step(0, 1500)
    assert g.max_step == 600 and g.sds.sampler.t_max == 600
    with pytest.raises(ValueError, match="spec"):
        scheduled_value([0, 1.0, 0.5, 100, 0.2], 0)


def test_image_size_follows_threestudio_512(tiny_sd_path):
    """Item 5: images go to 512 px (latents 64) by default, whatever the UNet's sample_size, as threestudio."""
    from carv.integrations.threestudio import CarvGuidance, CarvGuidanceConfig

    assert CarvGuidanceConfig().image_size == 512
    g = CarvGuidance({"pretrained_model_name_or_path": str(tiny_sd_path), "half_precision_weights": False,
                      "image_size": 32, "K": 1}, device="cpu")
    el, az, dist = torch.tensor([10.0]), torch.tensor([0.0]), torch.full((1,), 3.0)
    pu = g.teacher.encode_prompt("a cat")
    g(torch.rand(1, 48, 48, 3), pu, el, az, dist)
    assert g.last_output.grad.shape == (1, 4, 4, 4)  # 32 px -> 4x4 latents
    g(torch.rand(1, 48, 48, 4), pu, el, az, dist, rgb_as_latents=True)
    assert g.last_output.grad.shape == (1, 4, 4, 4)
    with pytest.raises(ValueError, match="image_size"):
        CarvGuidance({"image_size": 100}, teacher=g.teacher, device="cpu")


def test_decode_latents_and_set_min_max_steps_as_threestudios_systems_call_them(tiny_sd_path):
    """latentnerf / sjc call guidance.decode_latents(latents, h, w); imagedreamfusion calls set_min_max_steps."""
    from carv.integrations.threestudio import CarvGuidance

    g = CarvGuidance({"pretrained_model_name_or_path": str(tiny_sd_path), "half_precision_weights": False, "K": 1},
                     device="cpu")
    img = g.decode_latents(torch.randn(2, 4, 5, 5), latent_height=8, latent_width=8)
    assert img.shape == (2, 3, 64, 64) and 0.0 <= float(img.min()) <= float(img.max()) <= 1.0
    with torch.no_grad():  # by hand: 1 / scaling_factor, VAE decode, [-1, 1] -> [0, 1]
        lat = torch.randn(1, 4, 8, 8)
        want = (g.teacher.vae.decode(lat / g.teacher.vae.config.scaling_factor).sample * 0.5 + 0.5).clamp(0, 1)
        assert torch.allclose(g.decode_latents(lat, 8, 8), want, atol=1e-6)
    g.set_min_max_steps(0.1, 0.5)
    assert (g.min_step, g.max_step) == (100, 500) and (g.sds.sampler.t_min, g.sds.sampler.t_max) == (100, 500)
    with pytest.raises(ValueError, match=r"^min_step_percent, max_step_percent: .*got 0.6 and 0.5$"):
        g.set_min_max_steps(0.6, 0.5)
    with pytest.raises(ValueError, match="^latent_height: expected a positive integer, got 0$"):
        g.decode_latents(torch.randn(1, 4, 8, 8), latent_height=0)
    with pytest.raises(ValueError, match=r"^latents: expected \[B, C, h, w\], got \(4, 8, 8\)$"):
        g.decode_latents(torch.randn(4, 8, 8))


def _call_args(B=2):
    el, az = torch.tensor([10.0, 20.0][:B]), torch.tensor([0.0, 90.0][:B])
    return torch.rand(B, 16, 16, 3), el, az, torch.full((B,), 3.0)


def test_bad_config_values_are_named_before_any_model_loads(threestudio, tiny_sd_path):
    """A config value that cannot work is one ValueError/TypeError naming the key, raised before the teacher
    loads (the path below does not exist: reaching the load would be an OSError)."""
    from carv.integrations.threestudio import register

    cls = register()
    # caught by carv's checks (threestudio's OmegaConf converts "no" to False, as it would for its own guidance)
    cases = {"K": 0, "proposal_every": 0, "k_max": 1, "trainer_max_steps": 0, "probe_every": 0, "seed": -1,
             "grad_clip": "x", "max_step_percent": [0, 0.98], "image_size": 60, "view_dependent_prompting": "maybe"}
    for key, value in cases.items():
        cfg = guidance_cfg("/nonexistent/model", **{key: value})
        with pytest.raises((ValueError, TypeError), match=rf"^{key}: .*{re.escape(repr(value))}"):
            cls(cfg)
    # caught by OmegaConf's type check, reported as one line naming the key and value
    for key, value in {"seed": "x", "K": 2.5, "guidance_scale": "big", "auto_k": "perhaps"}.items():
        with pytest.raises(ValueError, match=rf"^{key}: Value '{value}' .*(could not be converted|not a valid)"):
            cls(guidance_cfg("/nonexistent/model", **{key: value}))
    assert cls(guidance_cfg(tiny_sd_path, K="2", view_dependent_prompting="no")).config.view_dependent_prompting \
        is False  # OmegaConf's conversions, as threestudio's own guidance gets them
    with pytest.raises(ValueError, match=r"^min_step_percent, max_step_percent: .* got 0.99 and 0.98"):
        cls(guidance_cfg(tiny_sd_path, min_step_percent=0.99, max_step_percent=0.98))


def test_bad_call_arguments_are_named(threestudio, tiny_sd_path):
    """Channels-first images, latents without rgb_as_latents (and images with it), camera tensors of another batch
    size, and a prompt where prompt_utils belongs: one line naming the argument."""
    from carv.integrations.threestudio import register

    g = register()(guidance_cfg(tiny_sd_path, K=1, image_size=32))
    pu = g.teacher.encode_prompt("a cat")
    rgb, el, az, dist = _call_args()
    cases = [((rgb.permute(0, 3, 1, 2), pu, el, az, dist), {}, r"^rgb: .*\[B, H, W, 3\].*channels last"),
             ((torch.rand(2, 16, 16, 4), pu, el, az, dist), {}, "^rgb: .*pass rgb_as_latents=True$"),
             ((rgb, pu, el, az, dist), {"rgb_as_latents": True}, r"^rgb: with rgb_as_latents=True .*\[B, H, W, 4\]"),
             ((rgb, pu, el[:1], az[:1], dist[:1]), {}, r"^elevation: expected a tensor \[B\] with B = 2.*\(1,\)$"),
             ((rgb, pu, el, az, torch.full((3,), 3.0)), {}, r"^camera_distances: .*B = 2.*\(3,\)$"),
             ((rgb * 255, pu, el, az, dist), {}, "^rgb: expected floats in \\[0, 1\\].*divide by 255"),
             ((rgb.clone().fill_(float("nan")), pu, el, az, dist), {}, "^rgb: expected finite")]
    for args, kwargs, msg in cases:
        with pytest.raises(ValueError, match=msg):
            g(*args, **kwargs)
    with pytest.raises(TypeError, match="^prompt_utils: expected .*got str$"):
        g(rgb, "a cat", el, az, dist)
    for as_latents in (False, True):  # renders on another device than the teacher
        with pytest.raises(ValueError, match="^rgb: on meta, but the teacher's UNet2DConditionModel is on cpu"):
            g(torch.zeros(2, 16, 16, 4 if as_latents else 3, device="meta"), pu, el, az, dist,
              rgb_as_latents=as_latents)

    class OtherModel:  # a prompt processor that loaded another model (wider text embeddings), or a wrong shape
        def __init__(self, shape):
            self.shape = shape

        def get_text_embeddings(self, elevation, azimuth, camera_distances, view_dependent_prompting=True):
            return torch.zeros(self.shape)

    L, D = pu.text_embeddings.shape[1:]
    with pytest.raises(ValueError, match=rf"^prompt_utils: text embeddings of width {D + 1}, but .* takes {D}: "):
        g(rgb, OtherModel((4, L, D + 1)), el, az, dist)
    with pytest.raises(ValueError, match=r"^prompt_utils: get_text_embeddings must return \[2B, L, D\] = \[4, L, D\]"):
        g(rgb, OtherModel((2, L, D)), el, az, dist)


@pytest.mark.parametrize(("proposal", "every"), [("auto", 1), ("auto", 2), ("learned", 3)])
def test_resume_continues_as_the_uninterrupted_run(threestudio, tiny_sd_path, proposal, every):
    """state_dict / load_state_dict: a guidance rebuilt from its config, restored with on_load_weights=True (as
    threestudio's load_weights) and the saved state, makes the same draws and gradient as the one that ran on;
    the learned proposal's statistics, the selector's state and the table in use come back, also when the
    statistics have moved since the last refresh. A second guidance in the process does not disturb either."""
    from safetensors.torch import load_file, save_file

    from carv.integrations.threestudio import register

    cls = register()
    cfg = guidance_cfg(tiny_sd_path, K=3, image_size=32, proposal=proposal, proposal_every=every)

    def eager(g):  # a selector that compares from the first draw and takes any gain: it moves within a few steps
        if g.selector is not None:
            g.selector.min_draws, g.selector.sigmas, g.selector.min_gain = 1, 0.0, 0.0
        return g

    a = eager(cls(cfg))
    pu = a.teacher.encode_prompt("a cat")
    rgb, el, az, dist = _call_args()
    for step in range(5):
        a.do_update_step(0, step)
        a(rgb, pu, el, az, dist)
    a.do_update_step(0, 4)  # a second call at one global step (threestudio's validation batches) counts nothing
    if proposal == "auto":
        assert a.selector.history and a.selector.steps == 5  # one count per global step
    path = tiny_sd_path.parent / "guidance.safetensors"
    save_file(a.state_dict(), str(path))
    b = eager(cls(cfg))
    other = cls(guidance_cfg(tiny_sd_path, K=2, image_size=32, seed=5))  # a second guidance in the process
    other(rgb, pu, el, az, dist)
    b.do_update_step(0, 4, on_load_weights=True)
    b.load_state_dict(load_file(str(path)))
    assert torch.equal(b.learned.m2, a.learned.m2) and b.K == a.K == 3
    assert torch.equal(b.sds.sampler.q, a.sds.sampler.q) and b.proposal == a.proposal
    if proposal == "auto":
        assert b.selector.state_dict().keys() == a.selector.state_dict().keys()
        assert all(torch.equal(v, a.selector.state_dict()[k]) for k, v in b.selector.state_dict().items())
    for step in (5, 6, 7):
        a.do_update_step(0, step)
        b.do_update_step(0, step)
        out_a, out_b = a(rgb, pu, el, az, dist), b(rgb, pu, el, az, dist)
        assert torch.equal(a.last_output.draws.t, b.last_output.draws.t)
        assert float(out_a["grad_norm"]) == pytest.approx(float(out_b["grad_norm"]), rel=1e-5)
    with pytest.raises(ValueError, match=r"^state: expected the keys \["):
        b.load_state_dict({"K": torch.tensor(2)})
