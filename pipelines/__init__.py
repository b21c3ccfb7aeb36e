"""Data pipelines: how training and evaluation images are read, augmented and batched.

datasets.py     SYNTH, ImageNet/ImageFolder/CIFAR, the published per-stage CPU transforms,
                the one persistent training loader, exact sharded evaluation
fastpath.py     --data_pipeline fast: crop/augment at B with reduced-size JPEG decoding,
                normalisation and random erasing on the device
gpudata.py      --data_pipeline gpu: workers read bytes and draw parameters, the device
                decodes, crops, augments and erases
gpu_randaug.py  timm's RandAugment drawn in the worker, applied batched on a device
store.py        reduced-size copies of the training images (--image_store)
errors.py       BadImageError, which the loader and every pipeline raise for an unreadable image
"""
