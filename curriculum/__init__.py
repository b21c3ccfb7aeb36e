"""EfficientTrain / EfficientTrain++, the method: plans, low-frequency operations,
model adaptation between stages, and the replay buffer (the data pipelines that feed
it are in pipelines/).

plan.py     Stage, Plan and the progress measure that drives every schedule
presets.py  the published schedules (et, etpp) and custom JSON curriculum files
lowfreq.py  the Fourier low-frequency crop and the Lanczos CPU approximation
adapt.py    resizing ViT/Swin/CSWin (and their optimizer moments, EMA) to a stage's B
replay.py   the replay buffer for data-loading-bound stages
"""
from curriculum.plan import Plan, Stage
from curriculum.presets import PlanError, build_plan, load_plan_file

__all__ = ['Plan', 'Stage', 'PlanError', 'build_plan', 'load_plan_file']
