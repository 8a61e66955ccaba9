"""A pack's rendezvous (pcsweep.pc.gang): members' batches computed together, each member's failure its own."""

import threading

import torch

from helpers import compose_settings
from pcsweep.model.mlp import MLP
from pcsweep.model.twins import PCModule
from pcsweep.pc import Inference, PCEngine
from pcsweep.pc.gang import Gang


def member(seed: int):
    torch.manual_seed(seed)
    net = MLP(6, 8, 3, 4).double().as_pc_network(None, "mse")
    return PCEngine(net, Inference(steps=8, step_size=0.05)), torch.optim.SGD(net.parameters(), lr=0.1)


def data(seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(5, 6, generator=gen, dtype=torch.float64)
    return x, torch.nn.functional.one_hot(torch.randint(0, 4, (5,), generator=gen), 4).double()


def test_one_members_failure_inside_a_packed_batch_fails_that_member_alone():
    """Member 1's optimizer raises in the first batch: it alone sees the error (and leaves, as a failed run does);
    member 0 trains its three batches, equal to its solo run."""
    gang = Gang(2)
    engines = [member(0), member(1)]
    seats = [gang.seat(i, engine) for i, (engine, _) in enumerate(engines)]
    outcomes: dict[int, list] = {0: [], 1: []}

    def broken():
        raise RuntimeError("member 1's optimizer broke")

    def train(i: int) -> None:
        engine, opt = engines[i]
        try:
            for b in range(3):
                outcomes[i].append(seats[i].train_batch(*data(b), opt.step if i == 0 else broken))
        except RuntimeError as exc:
            outcomes[i].append(exc)
        finally:
            seats[i].leave()

    threads = [threading.Thread(target=train, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert len(outcomes[1]) == 1 and "member 1's optimizer broke" in str(outcomes[1][0])
    assert len(outcomes[0]) == 3 and not any(isinstance(o, Exception) for o in outcomes[0])
    solo, opt = member(0)
    for b in range(3):
        solo.train_batch(*data(b), opt.step)
    for a, b in zip(engines[0][0].net.parameters(), solo.net.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_a_member_leaves_its_pack_when_its_training_ends_not_after_its_files(tmp_path):
    """The others' batches do not wait while a finished member writes its files: PCModule leaves the gang at
    on_train_end. Member 0's gang slot is gone before its run returns; member 1 then trains alone at once."""
    gang = Gang(2)
    module = PCModule(compose_settings("algo=pc", "width=8", "depth=2"), num_features=6, num_classes=4)
    module.seat = gang.seat(0, module.engine)
    engine, opt = member(1)
    gang.seat(1, engine)
    module.on_train_end()
    assert gang.active == {1}
    done = threading.Event()

    def alone():  # would wait for member 0 forever if it were still seated
        gang.train_batch(1, (*data(0), opt.step, False))
        done.set()

    thread = threading.Thread(target=alone, daemon=True)
    thread.start()
    assert done.wait(timeout=30)
