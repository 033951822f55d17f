"""Pickles through stylegan/stylegan-utils: persistence (NVIDIA's format, written and read),
legacy.load_network_pkl, dnnlib, and generator_io on top of them. The key test builds a pickle in
NVIDIA's exact shape, whose embedded source imports every module and calls every function NVIDIA's
network code does, and loads it in a fresh interpreter that has only stylegan-utils on sys.path."""
import copy
import hashlib
import importlib
import io
import os
import pickle
import subprocess
import sys
import uuid

import numpy as np
import pytest
import torch

import generator_io
from compact_stylegan import CompactGenerator
from generator_io import GeneratorLoadError, load_generator_pickle, save_generator_pickle

generator_io.add_stylegan_utils_to_path()

import dnnlib  # noqa: E402
import legacy  # noqa: E402
from torch_utils import persistence  # noqa: E402

UTILS_DIR = generator_io.STYLEGAN_UTILS_DIR

PROBE_SOURCE = '''"""A miniature class-conditional generator written like NVIDIA's network code: it imports every
module their pickled sources import and calls every function they call."""
import numpy as np
import scipy.optimize
import scipy.signal
import torch

import dnnlib
import legacy
from torch_utils import misc
from torch_utils import persistence
from torch_utils.ops import (bias_act, conv2d_gradfix, conv2d_resample, filtered_lrelu, fma,
                             grid_sample_gradfix, upfirdn2d)


@misc.profiled_function
def normalize_2nd_moment(x):
    return x * (x.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()


@persistence.persistent_class
class MappingNetwork(torch.nn.Module):
    def __init__(self, z_dim, c_dim, w_dim, num_ws):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws = z_dim, c_dim, w_dim, num_ws
        self.weight = torch.nn.Parameter(torch.randn([w_dim, z_dim + c_dim]))
        self.bias = torch.nn.Parameter(torch.randn([w_dim]) * 0.1)
        self.weight_gain = 1 / np.sqrt(z_dim + c_dim)  # a NumPy scalar in the pickled state
        self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(self, z, c, truncation_psi=1, truncation_cutoff=None, update_emas=False):
        misc.assert_shape(z, [None, self.z_dim])
        misc.assert_shape(c, [z.shape[0], self.c_dim])
        x = torch.cat([normalize_2nd_moment(z), c], dim=1)
        x = bias_act.bias_act(x.matmul(self.weight.t() * self.weight_gain), self.bias, act="lrelu")
        ws = x.unsqueeze(1).repeat([1, self.num_ws, 1])
        return self.w_avg.lerp(ws, truncation_psi) if truncation_psi != 1 else ws


@persistence.persistent_class
class SynthesisNetwork(torch.nn.Module):
    def __init__(self, w_dim, img_resolution, img_channels, channels=4):
        super().__init__()
        self.w_dim, self.img_resolution, self.img_channels, self.num_ws = w_dim, img_resolution, img_channels, 2
        self.size = np.broadcast_to(np.asarray(img_resolution), [2])  # a NumPy array in the pickled state
        self.config = dnnlib.EasyDict(channels=channels, conv_clamp=256)
        self.const = torch.nn.Parameter(torch.randn([channels, img_resolution // 4, img_resolution // 4]))
        self.affine = torch.nn.Parameter(torch.randn([channels, w_dim]) / np.sqrt(w_dim))
        self.rgb_affine = torch.nn.Parameter(torch.randn([img_channels, w_dim]) / np.sqrt(w_dim))
        for name in ("up_weight", "mid_weight", "transpose_weight", "down_weight"):
            setattr(self, name, torch.nn.Parameter(torch.randn([channels, channels, 3, 3]) / 6))
        self.rgb_weight = torch.nn.Parameter(torch.randn([img_channels, channels, 1, 1]))
        self.bias = torch.nn.Parameter(torch.randn([channels]) * 0.1)
        self.noise_strength = torch.nn.Parameter(torch.tensor(0.1))
        self.register_buffer("noise_const", torch.randn([img_resolution // 2, img_resolution // 2]))
        self.register_buffer("resample_filter", upfirdn2d.setup_filter([1, 3, 3, 1]))
        # Like StyleGAN3, design the filter with scipy.signal and a gain with SciPy when constructed.
        lowpass = scipy.signal.firwin(numtaps=8, cutoff=0.25, fs=2)
        self.register_buffer("lowpass", torch.as_tensor(lowpass, dtype=torch.float32))
        self.lrelu_gain = float(scipy.optimize.brentq(lambda gain: gain * gain - 2, 0, 2))
        self.act_gain = bias_act.activation_funcs["lrelu"].def_gain

    def forward(self, ws, noise_mode="random", force_fp32=False, update_emas=False):
        misc.assert_shape(ws, [None, self.num_ws, self.w_dim])
        with misc.suppress_tracer_warnings():
            batch = int(ws.shape[0])
        channels = self.config.channels
        styles = ws[:, 0].matmul(self.affine.t()) + 1
        x = self.const.unsqueeze(0).repeat([batch, 1, 1, 1])

        # StyleGAN2: modulated upsampling convolution, demodulation and noise in one fma, bias_act.
        dcoefs = (self.up_weight.unsqueeze(0) * styles.reshape(batch, 1, -1, 1, 1)).square().sum(dim=[2, 3, 4])
        x = conv2d_resample.conv2d_resample(x=x * styles.reshape(batch, -1, 1, 1), w=self.up_weight,
                                            f=self.resample_filter, up=2, padding=1, flip_weight=False)
        noise = self.noise_const if noise_mode == "const" else torch.randn_like(self.noise_const)
        noise = torch.zeros_like(noise) if noise_mode == "none" else noise
        x = fma.fma(x, (dcoefs + 1e-8).rsqrt().reshape(batch, -1, 1, 1), noise * self.noise_strength)
        x = bias_act.bias_act(x, self.bias, act="lrelu", gain=self.act_gain, clamp=self.config.conv_clamp)

        # StyleGAN3: grouped modulated convolution, then the filtered leaky ReLU.
        weight = (self.mid_weight.unsqueeze(0) * styles.reshape(batch, 1, -1, 1, 1)).reshape(-1, channels, 3, 3)
        x = conv2d_gradfix.conv2d(input=x.reshape(1, -1, *x.shape[2:]), weight=weight, padding=1, groups=batch)
        x = x.reshape(batch, -1, *x.shape[2:])
        x = filtered_lrelu.filtered_lrelu(x=x, fu=self.lowpass, fd=self.lowpass, b=self.bias, up=2, down=2,
                                          padding=[7, 6, 7, 6], gain=self.lrelu_gain, slope=0.2,
                                          clamp=self.config.conv_clamp)
        x = conv2d_gradfix.conv_transpose2d(input=x, weight=self.transpose_weight, padding=1)

        # Resampling as discriminators and skip connections do.
        x = conv2d_resample.conv2d_resample(x=x, w=self.down_weight, f=self.resample_filter, down=2, padding=1)
        x = upfirdn2d.upsample2d(x, self.resample_filter)
        x = upfirdn2d.upfirdn2d(x, self.resample_filter, up=2, padding=[2, 1, 2, 1], gain=4)
        x = upfirdn2d.downsample2d(upfirdn2d.upsample2d(x, self.resample_filter), self.resample_filter)
        x = upfirdn2d.filter2d(x, self.resample_filter)
        rgb_styles = ws[:, 1].matmul(self.rgb_affine.t()).reshape(batch, -1, 1, 1)
        img = conv2d_gradfix.conv2d(x, self.rgb_weight) * (1 + rgb_styles)

        # A small translation, as augmentation pipelines apply with grid_sample.
        theta = torch.tensor([[1.0, 0.0, 0.1], [0.0, 1.0, -0.1]], device=img.device).repeat([batch, 1, 1])
        grid = torch.nn.functional.affine_grid(theta, [batch, self.img_channels, self.size[1], self.size[0]],
                                               align_corners=False)
        img = grid_sample_gradfix.grid_sample(img, grid)
        misc.assert_shape(img, [batch, self.img_channels, self.img_resolution, self.img_resolution])
        return img.to(torch.float32)


@persistence.persistent_class
class Generator(torch.nn.Module):
    def __init__(self, z_dim, c_dim, w_dim, img_resolution, img_channels):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim = z_dim, c_dim, w_dim
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.synthesis = SynthesisNetwork(w_dim, img_resolution, img_channels)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim, c_dim, w_dim, self.num_ws)

    def forward(self, z, c, truncation_psi=1, truncation_cutoff=None, update_emas=False, **synthesis_kwargs):
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.synthesis(ws, update_emas=update_emas, **synthesis_kwargs)

    def load_stem(self, url):
        """As StyleGAN-XL's super-resolution generator does: adopt the mapping of another network pickle."""
        with dnnlib.util.open_url(url) as f:
            stem = legacy.load_network_pkl(f)["G_ema"]
        misc.copy_params_and_buffers(stem.mapping, self.mapping, require_all=True)
'''


# ---- helpers ---------------------------------------------------------------------------------

def import_temp_module(directory, source, prefix="probe"):
    """Writes source as a uniquely named module in directory and imports it; the folder leaves
    sys.path again, so a fresh interpreter cannot import the module by name."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.py").write_text(source)
    sys.path.insert(0, str(directory))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(directory))


def forget_module(module):
    """Makes a temp module unimportable in this process too."""
    del sys.modules[module.__name__]


class NvidiaShapedPickler(pickle.Pickler):
    """Writes the instances of one module's classes the way NVIDIA's persistence does, with the meta
    dict built here rather than by the classes' own __reduce__."""

    def __init__(self, file, protocol, module_name, source):
        super().__init__(file, protocol=protocol)
        self.module_name, self.source = module_name, source

    def reducer_override(self, obj):
        if isinstance(obj, type) or type(obj).__module__ != self.module_name:
            return NotImplemented
        meta = dict(type="class", version=6, module_src=self.source, class_name=type(obj).__name__,
                    state=dict(vars(obj)))
        return persistence._reconstruct_persistent_obj, (meta,)


def nvidia_shaped_pickle(data, module, source, protocol=4, numpy1_names=False):
    buffer = io.BytesIO()
    NvidiaShapedPickler(buffer, protocol, module.__name__, source).dump(data)
    raw = buffer.getvalue()
    if numpy1_names:  # as pickled by NumPy 1.x: protocol 2 names globals in plain text
        assert protocol == 2 and raw.count(b"cnumpy._core.multiarray\n") > 0
        raw = raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    return raw


def run_fresh(script, cwd, only_utils=True):
    """Runs script in a new interpreter started in cwd, with stylegan-utils first on sys.path and,
    if only_utils, no other project folder or the current directory."""
    prelude = "import sys\n"
    if only_utils:
        prelude += f"sys.path[:] = [{UTILS_DIR!r}] + [p for p in sys.path if p not in ('', {str(cwd)!r})]\n"
        # The project's editable install finds its modules through a finder of its own: drop it too.
        prelude += ("sys.meta_path[:] = [f for f in sys.meta_path "
                    "if not getattr(f, '__module__', '').startswith('__editable__')]\n")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", prelude + script],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


# ---- the official format, every module and function --------------------------------------------

@pytest.mark.parametrize("protocol, numpy1_names", [(2, True), (4, False)])
def test_nvidia_shaped_pickle_using_every_module_and_function_loads_in_a_fresh_process(tmp_path, protocol,
                                                                                     numpy1_names):
    probe = import_temp_module(tmp_path / "source", PROBE_SOURCE)
    torch.manual_seed(0)
    G = probe.Generator(z_dim=6, c_dim=3, w_dim=8, img_resolution=16, img_channels=3)
    stem = probe.Generator(z_dim=6, c_dim=3, w_dim=8, img_resolution=16, img_channels=3)
    data = dict(G=G, G_ema=copy.deepcopy(G), augment_pipe=None,
                training_set_kwargs=dnnlib.EasyDict(resolution=16, use_labels=True))
    (tmp_path / "network.pkl").write_bytes(nvidia_shaped_pickle(data, probe, PROBE_SOURCE, protocol, numpy1_names))
    (tmp_path / "stem.pkl").write_bytes(nvidia_shaped_pickle(dict(G_ema=stem), probe, PROBE_SOURCE, protocol))
    z = torch.randn(2, 6)
    c = torch.nn.functional.one_hot(torch.tensor([0, 2]), 3).float()
    torch.save(dict(z=z, c=c), tmp_path / "inputs.pt")
    work = tmp_path / "work"
    work.mkdir()

    run_fresh(f"""
import importlib.util, pickle, torch
import dnnlib, legacy, torch_utils
assert torch_utils.__file__.startswith({UTILS_DIR!r}) and importlib.util.find_spec({probe.__name__!r}) is None
with open({str(tmp_path / 'network.pkl')!r}, 'rb') as f:
    direct = pickle.load(f)['G_ema']
with open({str(tmp_path / 'network.pkl')!r}, 'rb') as f:
    data = legacy.load_network_pkl(f)
G = data['G_ema']
assert type(G) is type(direct) and type(G).__name__ == 'Generator'
assert type(G).__module__.startswith('_imported_module_')
assert data['augment_pipe'] is None and type(data['training_set_kwargs']) is dnnlib.EasyDict
assert data['training_set_kwargs'].resolution == 16 and G.init_kwargs.img_resolution == 16
inputs = torch.load({str(tmp_path / 'inputs.pt')!r})
ws = G.mapping(inputs['z'], inputs['c'])
ws_direct = direct.mapping(inputs['z'], inputs['c'])
ws_leaf = ws.detach().requires_grad_(True)
img = G.synthesis(ws_leaf, noise_mode='const', force_fp32=True)
img.square().mean().backward()
G.load_stem({str(tmp_path / 'stem.pkl')!r})
ws_stem = G.mapping(inputs['z'], inputs['c'])
torch.save(dict(ws=ws.detach(), ws_direct=ws_direct.detach(), img=img.detach(), ws_grad=ws_leaf.grad,
                const_grad=G.synthesis.const.grad, ws_stem=ws_stem.detach()), {str(tmp_path / 'out.pt')!r})
""", work)

    out = torch.load(tmp_path / "out.pt")
    G_ema = data["G_ema"]
    ws = G_ema.mapping(z, c)
    ws_leaf = ws.detach().requires_grad_(True)
    img = G_ema.synthesis(ws_leaf, noise_mode="const", force_fp32=True)
    img.square().mean().backward()
    assert img.shape == (2, 3, 16, 16) and img.std() > 0.01
    assert (out["ws"] - ws).abs().max() < 1e-6 and (out["ws_direct"] - ws).abs().max() < 1e-6
    assert (out["img"] - img).abs().max() < 1e-5
    assert (out["ws_grad"] - ws_leaf.grad).abs().max() < 1e-6 and ws_leaf.grad.abs().sum() > 0
    assert (out["const_grad"] - G_ema.synthesis.const.grad).abs().max() < 1e-6
    assert (out["ws_stem"] - stem.mapping(z, c)).abs().max() < 1e-6
    assert (out["ws_stem"] - ws).abs().max() > 1e-3  # the stem's mapping really replaced G's


def test_compact_generator_saved_self_contained_loads_with_only_stylegan_utils(tmp_path):
    torch.manual_seed(0)
    G = CompactGenerator(z_dim=16, w_dim=16, c_dim=4, img_resolution=8)
    save_generator_pickle(G, tmp_path / "compact.pkl", self_contained=True)
    z = torch.randn(3, 16)
    c = torch.nn.functional.one_hot(torch.tensor([0, 1, 3]), 4).float()
    torch.save(dict(z=z, c=c), tmp_path / "inputs.pt")
    run_fresh(f"""
import importlib.util, pickle, torch, legacy
assert importlib.util.find_spec('compact_stylegan') is None and importlib.util.find_spec('generator_io') is None
with open({str(tmp_path / 'compact.pkl')!r}, 'rb') as f:
    G = pickle.load(f)['G_ema']
with open({str(tmp_path / 'compact.pkl')!r}, 'rb') as f:
    G2 = legacy.load_network_pkl(f)['G_ema']
assert type(G).__name__ == 'CompactGenerator' and type(G) is type(G2) and not G.training
inputs = torch.load({str(tmp_path / 'inputs.pt')!r})
ws = G.mapping(inputs['z'], inputs['c'])
torch.save(dict(ws=ws, img=G.synthesis(ws, noise_mode='const', force_fp32=True)), {str(tmp_path / 'out.pt')!r})
""", tmp_path)
    out = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        ws = G.mapping(z, c)
        # Another process may use another thread count, which reorders floating-point sums.
        assert torch.allclose(out["ws"], ws, atol=1e-6)
        assert torch.allclose(out["img"], G.synthesis(ws, noise_mode="const"), atol=1e-6)


# ---- persistence written by our own classes ----------------------------------------------------

LAYER_SOURCE = '''import torch
from torch_utils import persistence

SCALE = 2.0


@persistence.persistent_class
class ScaledLinear(torch.nn.Module):
    def __init__(self, features, bias_init=0.5, tag=None):
        super().__init__()
        self.linear = torch.nn.Linear(features, features)
        torch.nn.init.constant_(self.linear.bias, bias_init)
        self.tag = tag

    def forward(self, x):
        return self.linear(x) * SCALE


class Plain:
    pass
'''


class MetaRecorder(pickle.Unpickler):
    """Loads a pickle while recording each persistent object's meta dict."""

    def __init__(self, file):
        super().__init__(file)
        self.metas = []

    def find_class(self, module, name):
        if (module, name) == ("torch_utils.persistence", "_reconstruct_persistent_obj"):
            def record(meta):
                self.metas.append(meta)
                return persistence._reconstruct_persistent_obj(meta)
            return record
        return super().find_class(module, name)


def test_persistent_class_pickles_meta_in_nvidias_format_and_rebuilds_in_a_fresh_process(tmp_path):
    layers = import_temp_module(tmp_path / "source", LAYER_SOURCE, prefix="layers")
    torch.manual_seed(0)
    layer = layers.ScaledLinear(3, bias_init=0.25, tag=dnnlib.EasyDict(name="probe"))
    raw = pickle.dumps(layer)
    recorder = MetaRecorder(io.BytesIO(raw))
    copy_in_process = recorder.load()
    (meta,) = recorder.metas
    assert set(meta) == {"type", "version", "module_src", "class_name", "state"}
    assert (meta["type"], meta["version"], meta["class_name"]) == ("class", 6, "ScaledLinear")
    assert meta["module_src"] == LAYER_SOURCE
    assert meta["state"]["_init_args"] == (3,) and meta["state"]["_init_kwargs"]["bias_init"] == 0.25
    assert {"_parameters", "_modules", "training"} <= set(meta["state"])
    assert persistence.is_persistent(layer) and persistence.is_persistent(layers.ScaledLinear)
    assert not persistence.is_persistent(layers.Plain()) and not persistence.is_persistent({"a": 1})
    assert persistence.persistent_class(layers.ScaledLinear) is layers.ScaledLinear
    assert type(copy_in_process).__name__ == "ScaledLinear" and type(copy.deepcopy(layer)) is type(copy_in_process)

    (tmp_path / "layer.pkl").write_bytes(raw)
    x = torch.randn(2, 3)
    torch.save(x, tmp_path / "x.pt")
    printed = run_fresh(f"""
import pickle, torch
with open({str(tmp_path / 'layer.pkl')!r}, 'rb') as f:
    layer = pickle.load(f)
print(type(layer).__name__, layer.init_args, dict(layer.init_kwargs), layer.tag.name, type(layer.tag).__name__)
torch.save(layer(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r})
""", tmp_path)
    assert printed.strip() == "ScaledLinear (3,) {'bias_init': 0.25, 'tag': {'name': 'probe'}} probe EasyDict"
    assert torch.allclose(torch.load(tmp_path / "y.pt"), layer(x), atol=1e-6)


def test_import_hook_can_patch_the_source_before_it_runs(tmp_path):
    layers = import_temp_module(tmp_path, LAYER_SOURCE, prefix="layers")
    layer = layers.ScaledLinear(2)
    seen = []

    @persistence.import_hook
    def triple_the_scale(meta):
        seen.append((meta.class_name, type(meta).__name__, type(meta.state).__name__))
        meta.module_src = meta.module_src.replace("SCALE = 2.0", "SCALE = 3.0")
        return meta

    try:
        patched = pickle.loads(pickle.dumps(layer))
    finally:
        persistence._import_hooks.remove(triple_the_scale)
    assert seen == [("ScaledLinear", "EasyDict", "EasyDict")]
    x = torch.randn(4, 2)
    assert torch.allclose(patched(x), layer(x) * 1.5)


def test_unsupported_meta_and_missing_class_are_reported():
    source = "class Thing:\n    pass\n"
    with pytest.raises(ValueError, match="version 7"):
        persistence._reconstruct_persistent_obj(dict(type="class", version=7, module_src=source, class_name="Thing",
                                                     state={}))
    with pytest.raises(ValueError, match="defines no class 'Other'"):
        persistence._reconstruct_persistent_obj(dict(type="class", version=6, module_src=source, class_name="Other",
                                                     state={}))
    thing = persistence._reconstruct_persistent_obj(dict(type="class", version=6, module_src=source,
                                                         class_name="Thing", state={"size": 3}))
    assert thing.size == 3 and persistence.is_persistent(thing)


def test_module_state_from_old_pytorch_gains_the_attributes_current_pytorch_needs(tmp_path):
    layers = import_temp_module(tmp_path, LAYER_SOURCE, prefix="layers")
    layer = layers.ScaledLinear(2)
    old_torch_attributes = {"training", "_parameters", "_buffers", "_backward_hooks", "_forward_hooks",
                            "_forward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks", "_modules"}
    state = {key: value for key, value in vars(layer).items() if key in old_torch_attributes or not key.startswith("_")}
    state["_init_args"], state["_init_kwargs"] = (2,), {}
    rebuilt = persistence._reconstruct_persistent_obj(dict(type="class", version=6, module_src=LAYER_SOURCE,
                                                           class_name="ScaledLinear", state=state))
    x = torch.randn(3, 2)
    assert torch.equal(rebuilt(x), layer(x))
    rebuilt.eval().requires_grad_(False).to(torch.float64)
    assert sorted(rebuilt.state_dict()) == ["linear.bias", "linear.weight"]


def test_persistent_copy_makes_the_modules_own_classes_persistent_and_leaves_the_original():
    torch.manual_seed(0)
    G = CompactGenerator(z_dim=8, w_dim=8, img_resolution=8)
    copied = persistence.persistent_copy(G)
    assert not persistence.is_persistent(G) and persistence.is_persistent(copied)
    assert persistence.is_persistent(copied.synthesis.blocks[0].convs[0].affine)
    assert type(copied.synthesis.blocks) is torch.nn.ModuleList  # torch's classes stay as they are
    assert isinstance(copied, CompactGenerator)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        persistence.persistent_copy(object())


# ---- legacy -----------------------------------------------------------------------------------

PLAIN_SOURCE = '''import torch


class ProjectedDiscriminator(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.head = torch.nn.Conv2d(3, 1, 1)


class Settings(dict):
    pass


class Backbones(list):
    pass
'''


def test_load_network_pkl_stands_in_for_a_discriminator_whose_code_is_missing(tmp_path):
    probe = import_temp_module(tmp_path / "source", PROBE_SOURCE)
    discriminators = import_temp_module(tmp_path / "source", PLAIN_SOURCE, prefix="pg_modules")
    torch.manual_seed(0)
    G = probe.Generator(z_dim=6, c_dim=3, w_dim=8, img_resolution=16, img_channels=3)
    raw = nvidia_shaped_pickle(dict(G=G, D=discriminators.ProjectedDiscriminator(), G_ema=G), probe, PROBE_SOURCE)
    (tmp_path / "xl.pkl").write_bytes(raw)
    forget_module(discriminators)  # as in StyleGAN-XL's pickles: D needs the stylegan-xl repository

    with pytest.raises(ModuleNotFoundError):
        pickle.loads(raw)
    data = legacy.load_network_pkl(io.BytesIO(raw))
    assert isinstance(data["D"], legacy.UnavailableObject)
    assert type(data["D"]).missing_module == discriminators.__name__
    assert f"needs the module '{discriminators.__name__}'" in type(data["D"]).reason
    assert legacy.find_unavailable(data["G_ema"]) == [] and legacy.find_unavailable(data) == [type(data["D"])]
    z, c = torch.randn(1, 6), torch.eye(3)[:1]
    assert torch.equal(data["G_ema"].mapping(z, c), G.mapping(z, c))
    loaded = load_generator_pickle(tmp_path / "xl.pkl")
    assert not loaded.training and loaded.c_dim == 3


def test_stand_ins_keep_the_contents_of_dict_and_list_subclasses(tmp_path):
    missing = import_temp_module(tmp_path, PLAIN_SOURCE, prefix="timm_like")
    raw = pickle.dumps(dict(G_ema=torch.nn.Linear(1, 1), settings=missing.Settings(lr=0.1),
                            backbones=missing.Backbones(["efficientnet", "deit"])))
    forget_module(missing)
    data = legacy.load_network_pkl(io.BytesIO(raw))
    assert isinstance(data["settings"], legacy.UnavailableObject) and data["settings"].pickled_items == {"lr": 0.1}
    assert data["backbones"].pickled_items == ["efficientnet", "deit"]
    assert [cls.__name__ for cls in legacy.find_unavailable(data)] == ["Backbones", "Settings"]


def test_generator_whose_code_is_missing_is_refused_naming_the_module(tmp_path):
    discriminators = import_temp_module(tmp_path / "source", PLAIN_SOURCE, prefix="missing_code")
    raw = pickle.dumps(dict(G_ema=discriminators.ProjectedDiscriminator()))
    (tmp_path / "g.pkl").write_bytes(raw)
    forget_module(discriminators)
    with pytest.raises(ModuleNotFoundError, match="G_ema cannot be rebuilt") as caught:
        legacy.load_network_pkl(io.BytesIO(raw))
    assert caught.value.name == discriminators.__name__
    with pytest.raises(GeneratorLoadError, match=f"needs the module '{discriminators.__name__}'"):
        load_generator_pickle(tmp_path / "g.pkl")


def test_embedded_source_importing_a_missing_module(tmp_path):
    source = "import no_such_dependency_xyz\n\nclass Network:\n    pass\n"
    module = import_temp_module(tmp_path, "class Network:\n    pass\n", prefix="network")
    raw = nvidia_shaped_pickle(dict(G_ema=module.Network()), module, source)
    for _ in range(2):  # a failed source is not cached half-run: every load reports the same
        with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
            pickle.loads(raw)
    with pytest.raises(ModuleNotFoundError, match="imported by the pickled source of Network") as caught:
        legacy.load_network_pkl(io.BytesIO(raw))
    assert caught.value.name == "no_such_dependency_xyz"


def test_tensorflow_era_and_generatorless_pickles_are_refused():
    tensorflow_era = b"cdnnlib.tflib.network\nNetwork\n."
    with pytest.raises(pickle.UnpicklingError, match="TensorFlow-era StyleGAN pickle; convert it"):
        legacy.load_network_pkl(io.BytesIO(tensorflow_era))
    with pytest.raises(ValueError, match=r"expected a dict with 'G_ema', found \['D', 'G'\]"):
        legacy.load_network_pkl(io.BytesIO(pickle.dumps(dict(G=1, D=2))))
    with pytest.raises(ValueError, match="'G_ema' is a int, not a torch.nn.Module"):
        legacy.load_network_pkl(io.BytesIO(pickle.dumps(dict(G_ema=1))))


FP16_SOURCE = '''import torch
from torch_utils import persistence


@persistence.persistent_class
class Network(torch.nn.Module):
    def __init__(self, width, num_fp16_res=0, conv_clamp=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn([width]))
        self.num_fp16_res, self.conv_clamp = num_fp16_res, conv_clamp
'''


def test_force_fp16_rebuilds_persistent_networks_with_mixed_precision_settings(tmp_path):
    networks = import_temp_module(tmp_path, FP16_SOURCE, prefix="fp16")
    plain, already = networks.Network(5), networks.Network(3, num_fp16_res=4, conv_clamp=256)
    raw = pickle.dumps(dict(G=plain, D=already, G_ema=copy.deepcopy(plain)))
    data = legacy.load_network_pkl(io.BytesIO(raw), force_fp16=True)
    assert (data["G_ema"].num_fp16_res, data["G_ema"].conv_clamp) == (4, 256)
    assert torch.equal(data["G_ema"].weight, plain.weight) and data["G_ema"].init_args == (5,)
    assert not data["G_ema"].training and not data["G_ema"].weight.requires_grad
    assert data["D"].init_kwargs == {"num_fp16_res": 4, "conv_clamp": 256}
    assert (legacy.load_network_pkl(io.BytesIO(raw))["G"].num_fp16_res, plain.num_fp16_res) == (0, 0)


# ---- dnnlib -----------------------------------------------------------------------------------

def test_easydict_items_are_attributes_and_survive_pickle_and_copy():
    d = dnnlib.EasyDict(a=1)
    d.b = 2
    assert d["b"] == 2 and d.a == 1 and getattr(d, "missing", "default") == "default"
    with pytest.raises(AttributeError):
        d.missing
    del d.a
    assert dict(d) == {"b": 2}
    for clone in (pickle.loads(pickle.dumps(d)), copy.deepcopy(d)):
        assert type(clone) is dnnlib.EasyDict and clone == d and clone.b == 2
    assert dnnlib.util.EasyDict is dnnlib.EasyDict


def test_open_url_reads_paths_file_urls_and_cached_downloads(tmp_path, monkeypatch):
    path = tmp_path / "weights.pkl"
    path.write_bytes(b"local bytes")
    with dnnlib.util.open_url(str(path)) as file:
        assert file.read() == b"local bytes"
    with dnnlib.util.open_url(path.as_uri()) as file:
        assert file.read() == b"local bytes"
    assert dnnlib.util.open_url(path.as_uri(), return_filename=True) == str(path)

    monkeypatch.setenv("DNNLIB_CACHE_DIR", str(tmp_path / "cache"))
    assert dnnlib.make_cache_dir_path("downloads") == str(tmp_path / "cache" / "downloads")
    url = "https://example.invalid/models/imagenet64.pkl"
    cached = tmp_path / "cache" / "downloads" / f"{hashlib.md5(url.encode()).hexdigest()}_imagenet64.pkl"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"cached bytes")
    with dnnlib.util.open_url(url) as file:  # served from the cache: no network
        assert file.read() == b"cached bytes"
    assert dnnlib.util.open_url(url, return_filename=True) == str(cached)

    with pytest.raises(ValueError, match="needs cache=True"):
        dnnlib.util.open_url(url, return_filename=True, cache=False)
    with pytest.raises(ValueError, match="only local paths, file:// and http"):
        dnnlib.util.open_url("ftp://example.invalid/a.pkl")
    with pytest.raises(ValueError, match="num_attempts"):
        dnnlib.util.open_url(url, num_attempts=0)


# ---- generator_io's use of the loader -----------------------------------------------------------

def test_generator_io_reports_a_shadowing_or_missing_loader(tmp_path, monkeypatch):
    path = tmp_path / "g.pkl"
    save_generator_pickle(CompactGenerator(z_dim=8, w_dim=8, img_resolution=8), path)
    impostor = type(sys)("legacy")
    impostor.__file__ = str(tmp_path / "stylegan3" / "legacy.py")
    monkeypatch.setitem(sys.modules, "legacy", impostor)
    with pytest.raises(GeneratorLoadError, match="another module named 'legacy'") as caught:
        load_generator_pickle(path)
    assert str(tmp_path / "stylegan3" / "legacy.py") in str(caught.value) and "\n" not in str(caught.value)
    monkeypatch.setitem(sys.modules, "legacy", None)
    with pytest.raises(GeneratorLoadError, match="cannot import legacy from .*stylegan-utils"):
        load_generator_pickle(path)


def test_tensorflow_era_pickle_gets_a_one_line_generator_error(tmp_path):
    path = tmp_path / "stylegan2-ffhq-tf.pkl"
    path.write_bytes(b"cdnnlib.tflib.network\nNetwork\n.")
    with pytest.raises(GeneratorLoadError, match="not a readable generator pickle .*TensorFlow-era") as caught:
        load_generator_pickle(path)
    assert "\n" not in str(caught.value) and "stylegan-xl-models/README.md" in str(caught.value)


def test_numpy_arrays_in_state_come_back_as_arrays():
    # NVIDIA's StyleGAN3 layers keep sizes as NumPy arrays; a round trip through legacy keeps them.
    arrays = dict(G_ema=torch.nn.Module(), size=np.broadcast_to(np.asarray(36), [2]), rate=np.float64(16.0))
    data = legacy.load_network_pkl(io.BytesIO(pickle.dumps(arrays, protocol=2)))
    assert isinstance(data["size"], np.ndarray) and data["size"].tolist() == [36, 36]
    assert isinstance(data["rate"], np.float64) and data["rate"] == 16.0
