"""The Hugging Face Hub: `hf://ORG/REPO[@REVISION][/SUBFOLDER]` inputs turned into folders of the standard
Hugging Face cache before anything opens them, a repo's checkpoints listed for `select`, and a finished output
uploaded with `--push-to-hub`.

Only what an input needs is downloaded: its weights (an index and its shards, or one weights file, or an
adapter), and the model files an output copies (config, tokenizer, generation config); never optimizer,
scheduler, RNG or trainer state. Safetensors headers are read by range requests and checked across the inputs
before the weights are downloaded. With HF_HUB_OFFLINE=1 everything comes from the cache. Tokens are
huggingface_hub's own business (HF_TOKEN, `hf auth login`): ckptavg never reads or prints them.

Nothing below `discover` knows about the network: every function here hands back local paths.
huggingface_hub is imported inside the functions, so that it reads HF_ENDPOINT, HF_HUB_CACHE and
HF_HUB_OFFLINE when a hub input is first met, and `ckptavg --help` does not pay for its import.

The package's modules, each imported from above only: `spec` (what an hf:// name says), `repo` (a repo's files
and refs, from the cache or the Hub), `inputs` (hf:// inputs made local), `listing` (a repo's checkpoints as
plain rows for `select`) and `push` (an output uploaded).
"""

from ckptavg.formats.detect import weight_names
from ckptavg.hub.inputs import Localized, local_path, localize
from ckptavg.hub.listing import HubCheckpoint, list_checkpoints, mark_best
from ckptavg.hub.push import PushFailed, check_push, push, push_report
from ckptavg.hub.spec import HubSource, HubSpec, is_hub

__all__ = [
    "HubCheckpoint",
    "HubSource",
    "HubSpec",
    "Localized",
    "PushFailed",
    "check_push",
    "is_hub",
    "list_checkpoints",
    "local_path",
    "localize",
    "mark_best",
    "push",
    "push_report",
    "weight_names",
]
