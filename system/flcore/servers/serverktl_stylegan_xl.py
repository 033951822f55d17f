"""FedKTL with StyleGAN-XL (the paper's default): as StyleGAN3, but class-conditional, so valid latents
are mapped with random one-hot ImageNet labels."""
from flcore.generators.adapter import PaperDefaults
from flcore.servers.serverktl_stylegan_3 import ServerKTLStyleGAN3, StyleGANLatents
from flcore.errors import UserError

IMAGENET_CLASSES = 1000


class ServerKTLStyleGANXL(ServerKTLStyleGAN3):
    defaults = PaperDefaults(lamda=1.0, mu=50.0, server_lr=0.01)
    builtin_c_dim = IMAGENET_CLASSES
    weights_readme = "stylegan/stylegan-xl-models/README.md"

    def build_generator(self):
        adapter = super().build_generator()
        if isinstance(adapter, StyleGANLatents) and adapter.G.c_dim == 0:
            raise UserError(f"{self.args.generator_path} holds an unconditional generator (c_dim=0), but "
                            f"StyleGAN-XL is class-conditional; use -algo FedKTL-stylegan-3 for it")
        return adapter
