"""The one exception type for mistakes a user can fix (bad flag, missing file, impossible settings).

Entry scripts catch it, print one line per problem and exit with code 2, never a traceback.
Internal invariants use `assert`; everything a user can get wrong raises UserError.
"""

import sys

EXIT_USER_ERROR = 2


class UserError(Exception):
    """One or more user-fixable problems, each a complete sentence naming the field and the fix."""

    def __init__(self, problems: str | list[str], every_rank: bool = False):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        # A problem only this rank can see (its host cannot reach the head, say) is printed by the rank
        # that found it; the others are found identically by every rank and printed by rank 0.
        self.every_rank = every_rank
        super().__init__("; ".join(self.problems))


def report_and_exit(err: UserError, prog: str = "dist_glm") -> None:
    """Print each problem on its own line to stderr and exit 2.

    Every rank validates the same inputs and so raises the same error; only rank 0 prints so that
    a 16-rank job does not show the message 16 times (unless the error is this rank's own).
    """
    from dist_glm.distributed import rank_from_env

    if rank_from_env() == 0 or err.every_rank:
        for problem in err.problems:
            print(f"{prog}: error: {problem}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
