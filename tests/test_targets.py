"""The targets contract: the teacher online and its replay cache answer the loop the same way."""
import inspect

import pytest

from distill.build import OnlineTeacher
from distill.cache import TeacherCache
from distill.targets import Targets


@pytest.mark.parametrize("cls", [OnlineTeacher, TeacherCache])
def test_both_sources_of_targets_follow_the_protocol(cls):
    for name in ("to", "logits", "val_top5"):
        ours, contract = inspect.signature(getattr(cls, name)), inspect.signature(getattr(Targets, name))
        assert list(ours.parameters) == list(contract.parameters), (cls.__name__, name)


def test_the_online_teacher_is_a_targets_object():
    import torch

    online = OnlineTeacher(torch.nn.Identity(), num_val=4, num_classes=10)
    assert isinstance(online, Targets)
    assert not isinstance(object(), Targets)  # the check can fail
