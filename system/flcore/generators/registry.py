"""Image generators by name, like timm's model registry: -gen picks one, -GPath points at its file. Each entry
(flcore/generators/base.py) owns how it loads, how valid latents are drawn and rendered (its adapter), and the
paper's FedKTL hyperparameters where the paper has them. A user adds one with register_generator(name, entry)."""
from flcore.errors import UserError
from flcore.generators.dcgan import DCGAN, FACE_DCGAN, TINY_IMAGENET
from flcore.generators.stable_diffusion import STABLE_DIFFUSION
from flcore.generators.stylegan import STYLEGAN_3, STYLEGAN_XL, UNTRAINED

AUTO = "auto"

GENERATORS = {
    "stylegan-3": STYLEGAN_3,
    "stylegan-xl": STYLEGAN_XL,
    "dcgan": DCGAN,
    "face-dcgan": FACE_DCGAN,
    "tiny-imagenet": TINY_IMAGENET,
    "untrained": UNTRAINED,
    "stable-diffusion": STABLE_DIFFUSION,
}


def register_generator(name, entry):
    """Adds `entry` (a GeneratorEntry) under `name`, which -gen then accepts."""
    GENERATORS[name] = entry


def generator_entry(name):
    if name not in GENERATORS:
        raise UserError(f"unknown generator '{name}' (-gen); choose from: {', '.join([AUTO, *GENERATORS])}")
    return GENERATORS[name]


def resolve_generator(name, path, candidates, without_path):
    """The registered name of the generator to load. -gen `name` when it names one; for "auto": `without_path`
    when there is no -GPath, else the first of `candidates` (the algorithm's, in order) that recognizes the file,
    else the last of them (whose loader then says what is wrong with the file)."""
    if name != AUTO:
        return name
    if not path:
        return without_path
    return next((c for c in candidates if generator_entry(c).recognizes(path)), candidates[-1])


def load_generator(settings, context, cache):
    """The adapter of the generator that settings (-gen, -GPath, the algorithm's auto choice) select."""
    name = resolve_generator(settings.generator, settings.generator_path, settings.auto_generators,
                             settings.auto_without_path)
    return generator_entry(name).load(settings, context, cache)
