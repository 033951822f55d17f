"""FGL (Federated Generative Learning, Zhang et al.) as plain functions: class-level prompts built from class names,
the server's synthetic training set rendered by Stable Diffusion from the prompts clients sent, and the server's
training of the global model on it."""
import torch
import torch.nn.functional as F

from flcore.batching import shuffled_batches
from flcore.exchange import Payload
from flcore.images import to_client_images

# The paper's class-level template for ImageNet subsets (its Table 5): the label, then a style suffix.
DEFAULT_TEMPLATE = "{}, real world images, high resolution"


def class_prompts(class_names, template):
    """One prompt per class: the template with the class name in its `{}`."""
    return [template.format(name) for name in class_names]


def prompt_upload(label_counts, class_tokens):
    """What a client sends in FGL's first round: the token ids of the class-level prompts of the classes it holds."""
    classes = torch.nonzero(label_counts > 0).flatten()
    # Token ids travel as float32 (exact below 2**24; CLIP's vocabulary has 49,408) so that the upload counts
    # count them: they are FGL's whole upload.
    return Payload({"classes": classes, "prompt_tokens": class_tokens[classes].to(torch.float32)})


def pooled_prompts(uploads):
    """{class: token ids} over the clients' prompt uploads; a class-level prompt is the same on every client that
    holds the class, so the server keeps one per class."""
    pooled = {}
    for upload in uploads:
        for label, tokens in zip(upload.tensors["classes"].tolist(), upload.tensors["prompt_tokens"].long()):
            pooled.setdefault(label, tokens)
    return dict(sorted(pooled.items()))


def synthesize(pipeline, prompts, images_per_class, image_shape, latent_shape, steps, guidance, negative_prompt,
               batch_size, rng):
    """(images [n K', C, H, W] in the clients' shape and normalization, on the CPU; labels [n K']): n images per
    pooled class, each from its own initial noise drawn from `rng` (the same on any device)."""
    sigma = pipeline.initial_noise_sigma(steps)
    images, labels = [], []
    for label, tokens in prompts.items():
        embeddings = pipeline.embed_tokens(tokens.unsqueeze(0), negative_prompt, guided=guidance > 1)
        for start in range(0, images_per_class, batch_size):
            count = min(batch_size, images_per_class - start)
            latents = torch.randn(count, *latent_shape, generator=rng) * sigma
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=rng))
            rendered = pipeline.sample_from_latents(latents, embeddings, steps, guidance, seed=seed)
            # Copied outside inference mode, so the images can be trained on.
            images.append(to_client_images(rendered.to(torch.float32, copy=True), image_shape).cpu())
        labels.append(torch.full((images_per_class,), label, dtype=torch.long))
    return torch.cat(images), torch.cat(labels)


def train_on(model, images, labels, epochs, batch_size, learning_rate, momentum, rng):
    """SGD with momentum on (images, labels) for `epochs` shuffled epochs; returns the last epoch's mean loss."""
    device = next(model.parameters()).device
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum)
    model.train()
    loss_sum, steps = 0.0, 0
    for _ in range(epochs):
        loss_sum, steps = 0.0, 0
        for index in shuffled_batches(len(labels), batch_size, rng):
            loss = F.cross_entropy(model(images[index].to(device)), labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum, steps = loss_sum + loss.item(), steps + 1
    return loss_sum / max(steps, 1)
