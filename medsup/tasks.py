"""The task table: one row per segmentation task, pure data.

Imports nothing heavy (no torch, no numpy) so that ``medsup tasks`` answers instantly.
Adding a task means adding a row here and a ``configs/tasks/<name>.yaml`` with what differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Task:
    """One segmentation task.

    ``labels`` maps every label value that may appear in a label map to its name; 0 is background.
    ``lesion_classes`` are the classes foreground oversampling must not miss (tumours, nodules).
    ``organ_classes`` drive the task's postprocessing rule: the organ (with its lesions) keeps its largest
    connected component, and lesions must lie inside or touch it. Empty: no such rule (the rules a training
    fits on its validation cases, :mod:`medsup.inference.postprocess_fit`, still apply).
    """

    name: str
    description: str
    modality: str
    labels: dict[int, str]
    config: str
    lesion_classes: tuple[int, ...] = field(default=())
    organ_classes: tuple[int, ...] = field(default=())
    reference: str = ""
    #: CT display window (width, level) in HU for figures: soft tissue by default, lung for chest tasks
    window: tuple[float, float] = (400.0, 40.0)

    @property
    def num_classes(self) -> int:
        """Number of output channels of the network (background included)."""
        return max(self.labels) + 1

    @property
    def foreground(self) -> tuple[int, ...]:
        """Label values other than background, ascending."""
        return tuple(sorted(v for v in self.labels if v != 0))

    def as_dict(self) -> dict[str, object]:
        """JSON-ready view (label keys become strings, as in MSD dataset.json)."""
        return {
            "name": self.name,
            "description": self.description,
            "modality": self.modality,
            "labels": {str(k): v for k, v in sorted(self.labels.items())},
            "num_classes": self.num_classes,
            "lesion_classes": list(self.lesion_classes),
            "organ_classes": list(self.organ_classes),
            "config": self.config,
            "reference": self.reference,
        }


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            name="liver",
            description="Liver and liver tumour in contrast-enhanced abdominal CT",
            modality="CT",
            labels={0: "background", 1: "liver", 2: "tumour"},
            config="configs/tasks/liver.yaml",
            lesion_classes=(2,),
            organ_classes=(1,),
            reference="MSD Task03_Liver / LiTS",
        ),
        Task(
            name="lung",
            description="Lung tumour / nodule in chest CT",
            modality="CT",
            labels={0: "background", 1: "tumour"},
            config="configs/tasks/lung.yaml",
            lesion_classes=(1,),
            reference="MSD Task06_Lung",
            window=(1500.0, -600.0),
        ),
        Task(
            name="tiny",
            description="Tiny liver-like phantom for tests and smoke runs (seconds on a CPU)",
            modality="CT",
            labels={0: "background", 1: "organ", 2: "lesion"},
            config="configs/tasks/tiny.yaml",
            lesion_classes=(2,),
            organ_classes=(1,),
            reference="synthetic",
        ),
    )
}


def get_task(name: str) -> Task:
    """Return the task called ``name``; unknown names raise a ValueError listing the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None
