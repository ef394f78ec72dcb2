"""User-facing names of samplers and schedule types, as A1111 WebUI spells them.

These tuples are the contract between the request layer (which validates
names) and the sampler registry in ``core.samplers`` (which must implement
every one of them; a test checks both directions).
"""

SAMPLER_NAMES: tuple[str, ...] = (
    "Euler",
    "Euler a",
    "Heun",
    "LMS",
    "DPM2",
    "DPM2 a",
    "DPM++ 2M",
    "DPM++ 2M SDE",
    "DPM++ 3M SDE",
    "DPM++ SDE",
    "DPM++ 2S a",
    "DDIM",
    "UniPC",
    "LCM",
    "Restart",
)

SCHEDULE_NAMES: tuple[str, ...] = (
    "Automatic",
    "Karras",
    "Exponential",
    "SGM Uniform",
    "Simple",
    "Normal",
    "DDIM",
    "Beta",
    "Align Your Steps",
    "KL Optimal",
)


def canonical_sampler_name(name: str) -> str | None:
    """Match a sampler name case-insensitively, also accepting A1111's k_* aliases."""
    key = name.strip().lower()
    for canonical in SAMPLER_NAMES:
        if key == canonical.lower():
            return canonical
    return SAMPLER_ALIASES.get(key)


def canonical_schedule_name(name: str) -> str | None:
    """Match a schedule type case-insensitively; ComfyUI's names (``sgm_uniform``, ``ddim_uniform``,
    ``kl_optimal``, ``beta``) and A1111's API names are accepted too."""
    key = name.strip().lower().replace("_", " ")
    for canonical in SCHEDULE_NAMES:
        if key == canonical.lower():
            return canonical
    return _SCHEDULE_ALIASES.get(key)


_SCHEDULE_ALIASES = {"ddim uniform": "DDIM", "ays": "Align Your Steps", "automatic": "Automatic"}


# Aliases A1111 accepts in its API and that old infotexts carry.
SAMPLER_ALIASES = {
    "k_euler": "Euler",
    "k_euler_a": "Euler a",
    "k_euler_ancestral": "Euler a",
    "k_heun": "Heun",
    "k_lms": "LMS",
    "k_dpm_2": "DPM2",
    "k_dpm_2_a": "DPM2 a",
    "k_dpmpp_2m": "DPM++ 2M",
    "k_dpmpp_2m_sde": "DPM++ 2M SDE",
    "k_dpmpp_3m_sde": "DPM++ 3M SDE",
    "k_dpmpp_sde": "DPM++ SDE",
    "k_dpmpp_2s_a": "DPM++ 2S a",
    "k_lcm": "LCM",
    "ddim": "DDIM",
    "unipc": "UniPC",
    "lcm": "LCM",
    "restart": "Restart",
    # ComfyUI's KSampler names (its "_gpu" variants only move the Brownian tree to the GPU).
    "euler": "Euler",
    "euler_ancestral": "Euler a",
    "heun": "Heun",
    "lms": "LMS",
    "dpm_2": "DPM2",
    "dpm_2_ancestral": "DPM2 a",
    "dpmpp_2s_ancestral": "DPM++ 2S a",
    "dpmpp_sde": "DPM++ SDE",
    "dpmpp_sde_gpu": "DPM++ SDE",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_2m_sde_gpu": "DPM++ 2M SDE",
    "dpmpp_3m_sde": "DPM++ 3M SDE",
    "dpmpp_3m_sde_gpu": "DPM++ 3M SDE",
    "uni_pc": "UniPC",
    # A1111 < 1.9 wrote the schedule into the sampler name.
    "dpm++ 2m karras": "DPM++ 2M",
    "dpm++ sde karras": "DPM++ SDE",
    "dpm++ 2m sde karras": "DPM++ 2M SDE",
    "dpm++ 2m sde exponential": "DPM++ 2M SDE",
    "dpm++ 2s a karras": "DPM++ 2S a",
    "dpm2 karras": "DPM2",
    "dpm2 a karras": "DPM2 a",
    "lms karras": "LMS",
    "euler karras": "Euler",
}
