"""Server-side SGD over the rows the clients uploaded (FedGH's global head, FedTGP's trainable prototypes)."""
import torch


def train_on_rows(batch_loss, parameters, rows, epochs, batch_size, lr, rng):
    """`epochs` epochs of SGD on `batch_loss(row indices)` over `rows` uploaded rows, shuffled by `rng` (a
    torch.Generator), in batches of `batch_size`; returns the last epoch's mean loss."""
    optimizer = torch.optim.SGD(parameters, lr=lr)
    for _ in range(epochs):
        losses = []
        for index in torch.randperm(rows, generator=rng).split(batch_size):
            loss = batch_loss(index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return sum(losses) / len(losses)
