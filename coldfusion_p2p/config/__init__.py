"""Every setting of every command, with its default, in one place.

``schema`` holds the dataclasses (each field: type, default, help text), ``fields`` introspects
them (flat keys, help, coercion), ``loading`` reads config files and builds a config (defaults,
then the file, then flags), and ``validation`` checks what no single field's type can express.

The settings are grouped into small dataclasses (data, training, fusion, network, run) so that
library code receives only the part it needs, but their field names are unique across groups:
each field is exactly one command-line flag (``local_steps`` is ``--local-steps``) and one key of
a ``--config`` file (TOML or YAML, flat, ``local_steps`` or ``local-steps``). An unknown key is an
error, as in nanoGPT and torchtune: a typo must never silently fall back to a default.

Defaults are the ones measured on a 2-core CPU with the bundled all-MiniLM-L6-v2 (see
docs/measurements/): 20 local steps at lr 2e-4 with length-bucketed batches of 32 take 5-8 s, and
after fusion and the head re-fit the contributors clear their majority-class rates by far (TREC
0.90 against 0.27). The earlier 5e-5 x 8 steps left them at their majority rates: no learning, so
the fused base was the original plus noise.
"""

from __future__ import annotations

from coldfusion_p2p.config.fields import (  # noqa: F401
    coerce_value,
    config_fields,
    field_help,
    normalize_key,
)
from coldfusion_p2p.config.loading import (  # noqa: F401
    FILE_RELATIVE_KEYS,
    as_flags,
    build_config,
    read_config_file,
)
from coldfusion_p2p.config.schema import (  # noqa: F401
    BOOTSTRAP_PORT,
    DEMO_DEFAULTS,
    DEMO_QUICK,
    EVALUATION_METHODS,
    LOOPBACK_HOST_MADDR,
    BootstrapConfig,
    BootstrapSettings,
    DataConfig,
    DemoConfig,
    DemoSettings,
    EvaluateConfig,
    EvaluationSettings,
    FusionConfig,
    IdentityConfig,
    InviteConfig,
    InviteSettings,
    KeySettings,
    LoggingConfig,
    MonitorConfig,
    MonitorSettings,
    NetworkConfig,
    PeerConfig,
    RunConfig,
    SectionedConfig,
    SimulateConfig,
    SimulateSettings,
    TrainingConfig,
    effective_demo_settings,
)
from coldfusion_p2p.config.validation import (  # noqa: F401
    validate,
)
