"""The one exception type for mistakes a user can fix (bad flag, missing file, impossible settings).

The entry-point layer (dist_glm.cli) catches it, prints one line per problem and exits with code 2,
never a traceback. Internal invariants use `assert`; everything a user can get wrong raises UserError.
This module is the ground floor: it imports nothing from the package.
"""

EXIT_USER_ERROR = 2


class UserError(Exception):
    """One or more user-fixable problems, each a complete sentence naming the field and the fix."""

    def __init__(self, problems: str | list[str], every_rank: bool = False):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        # A problem only this rank can see (its host cannot reach the head, say) is printed by the rank
        # that found it; the others are found identically by every rank and printed by rank 0.
        self.every_rank = every_rank
        super().__init__("; ".join(self.problems))
