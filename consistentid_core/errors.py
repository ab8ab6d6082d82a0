"""One exception type per failure family.

Every message names the file or input at fault and says what to do about it, because the
people who read them are ComfyUI users looking at a red node, not developers with a debugger.
"""


class ConsistentIDError(Exception):
    """Base class of every error this pack raises on purpose."""


class CheckpointError(ConsistentIDError):
    """A ConsistentID weight file is missing, unreadable, of another model or of a wrong layout."""


class EmbedsError(ConsistentIDError):
    """A saved or combined face-embeds object is invalid, of another architecture or format version."""


class ModelFileError(ConsistentIDError):
    """An auxiliary model (insightface, face parser, CLIP vision) is missing, misplaced or of the wrong kind."""


class MissingDependencyError(ConsistentIDError):
    """An optional Python package (insightface, facexlib, onnxruntime) is not installed."""


class FaceNotFoundError(ConsistentIDError):
    """No usable face was found in a reference image."""


class InputImageError(ConsistentIDError):
    """A reference image has a shape, channel count or size the pipeline cannot use."""


class FaceOptionError(InputImageError, ValueError):
    """An option of the face step (face_select, colour order, det_size, provider, arch) is invalid."""


class ArchitectureMismatchError(ConsistentIDError):
    """Parts made for SD1.5 and SDXL (or for different ConsistentID files) were combined."""


class PromptError(ConsistentIDError):
    """A prompt or conditioning option is out of range or cannot be encoded."""


class EvaluationError(ConsistentIDError):
    """The evaluation (training/evaluate) got a missing folder or model, or inputs that do not match up."""


class TrainingDataError(ConsistentIDError):
    """A training data set (photos, manifest, label maps, ID embeddings, captions) is unusable."""


class TrainingConfigError(ConsistentIDError):
    """A training setting, base model or resource (memory) does not fit the training run."""
