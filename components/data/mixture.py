"""Domain mixture weights: temperature sampling p_i proportional to n_i^(1/T), or explicit weights."""

from __future__ import annotations

from collections.abc import Mapping


def mixture_weights(sizes: Mapping[str, int], *, temperature: float = 1.0,
                    explicit: Mapping[str, float] | None = None) -> dict[str, float]:
    """Sampling probability per domain.

    With `explicit` weights they are normalised (every domain must be listed, extra names are
    an error). Otherwise p_i = n_i^(1/T) / sum_j n_j^(1/T) over the domain sizes n_i (tokens):
    T = 1 samples proportionally to size, larger T flattens towards uniform.
    """
    if explicit:
        missing, extra = set(sizes) - set(explicit), set(explicit) - set(sizes)
        if missing or extra:
            raise ValueError(f"explicit mixture weights must name exactly the domains {sorted(sizes)}: "
                             f"missing {sorted(missing)}, unknown {sorted(extra)}")
        total = sum(explicit.values())
        return {d: explicit[d] / total for d in sizes}
    if temperature <= 0:
        raise ValueError(f"mixture temperature must be > 0, got {temperature}")
    powered = {d: float(n) ** (1.0 / temperature) for d, n in sizes.items() if n > 0}
    total = sum(powered.values())
    return {d: powered.get(d, 0.0) / total for d in sizes}
