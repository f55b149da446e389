"""One module per ``onnxprune`` verb: its ``add_arguments(parser)`` and ``run(args, log)``,
gathered in a ``Verb``; ``onnxprune.cli`` builds the parser from ``VERBS``."""

from onnxprune.commands import bench, calibrate, demo, export, generate, inspect, prune, recover, stats, verify
from onnxprune.commands.base import Verb

#: In the order ``onnxprune --help`` lists them: the pipeline's, then the extras.
VERBS: tuple[Verb, ...] = tuple(m.VERB for m in (export, calibrate, prune, inspect, verify, bench, generate, demo,
                                                     recover, stats))
