"""The experiment's task and arm names (no heavy imports: the CLI parser reads them)."""

TASKS = ("copy", "induction", "recall", "fixed_copy", "fixed_copy_gap")
ARMS = ("baseline", "traces", "crystallization", "both", "distilled", "oracle", "random")
MOE_ARMS = ("crystallization", "both", "distilled")
REFERENCE_ARMS = ("oracle", "random")


def parse_arms(text: str) -> list:
    """'baseline,traces' -> ['baseline', 'traces'] (order kept, duplicates dropped); ValueError
    naming the unknown arms."""
    arms = [a.strip() for a in str(text).split(",") if a.strip()]
    if not arms:
        raise ValueError("no arm given")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; known: {', '.join(ARMS)}")
    return list(dict.fromkeys(arms))
