"""llama-perplexity's statistics (tools/perplexity/perplexity.cpp), from per-token values.

Per scored token the head stage produces the NLL (and, for KL divergence, the KLD, Δp and whether the
argmaxes agree); everything reported is a function of those arrays, computed here exactly as
llama-perplexity reports it: means with its uncertainty formula, linear-interpolated percentiles, the
covariance of the two log-perplexities, RMS Δp with its uncertainty, binomial stderr for same-top-p.
"""

import math

import numpy as np

# label → fraction, in llama-perplexity's order of output
KLD_PERCENTILES = {"99.9%": 0.999, "99%": 0.99, "95%": 0.95, "90%": 0.90, "10%": 0.10, "5%": 0.05, "1%": 0.01,
                   "0.1%": 0.001}
DP_PERCENTILES = {"99.9%": 0.999, "99%": 0.99, "95%": 0.95, "90%": 0.90, "75%": 0.75, "25%": 0.25, "10%": 0.10,
                  "5%": 0.05, "1%": 0.01, "0.1%": 0.001}


def mean_and_uncertainty(values: np.ndarray) -> tuple[float, float]:
    """llama.cpp's (mean, sqrt(var / (n − 1))), the uncertainty 0 for 10 values or fewer."""
    n = len(values)
    if n < 1:
        return 0.0, 0.0
    mean = float(np.sum(values) / n)
    var = float(np.sum(values * values) / n) - mean * mean
    return mean, math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0


def covariance(a: np.ndarray, b: np.ndarray) -> float:
    n = len(a)
    if n < 10:
        return 0.0
    return (float(np.sum(a * b)) / n - float(np.sum(a)) / n * float(np.sum(b)) / n) / (n - 1)


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama.cpp's linear interpolation between the two nearest ranks."""
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    p = fraction * (len(sorted_values) - 1)
    i = int(p)
    p -= i
    return float((1 - p) * sorted_values[i] + p * sorted_values[min(i + 1, len(sorted_values) - 1)])


def median(sorted_values: np.ndarray) -> float:
    n = len(sorted_values)
    return float(0.5 * (sorted_values[n // 2] + sorted_values[n // 2 - 1]) if n % 2 == 0 else sorted_values[n // 2])


def perplexity_summary(nll: np.ndarray) -> dict[str, float]:
    """PPL = exp(mean NLL) ± ppl · sqrt(var(NLL) / (n − 1)), as llama-perplexity's final estimate."""
    nll = np.asarray(nll, dtype=np.float64)
    n = len(nll)
    mean = float(np.sum(nll) / n)
    var = float(np.sum(nll * nll) / n) - mean * mean
    ppl = math.exp(mean)
    return {"ppl": ppl, "ppl_stderr": ppl * math.sqrt(var / (n - 1)) if var > 0 and n > 1 else 0.0}


def _distribution(values: np.ndarray, labels: dict[str, float]) -> dict[str, float]:
    s = np.sort(np.asarray(values, dtype=np.float32))  # llama.cpp keeps these as float
    out = {"max": float(s[-1])}
    for label, fraction in labels.items():
        if fraction < 0.5 and "median" not in out:
            out["median"] = median(s)
        out[label] = percentile(s, fraction)
    out["min"] = float(s[0])
    return out


def kld_summary(kld: np.ndarray, p_diff: np.ndarray, nll_q: np.ndarray, nll_base: np.ndarray,
                same_top: np.ndarray) -> dict:
    """Everything `llama-perplexity --kl-divergence` prints, from per-token arrays (float64, bool)."""
    n = len(kld)
    log_ppl_q, log_ppl_q_unc = mean_and_uncertainty(nll_q)
    log_ppl_b, log_ppl_b_unc = mean_and_uncertainty(nll_base)
    cov = covariance(nll_q, nll_base)
    ppl_q, ppl_b = math.exp(log_ppl_q), math.exp(log_ppl_b)
    ratio_log = log_ppl_q - log_ppl_b
    ratio_log_unc = math.sqrt(max(0.0, log_ppl_q_unc**2 + log_ppl_b_unc**2 - 2 * cov))
    ppl_q_unc, ppl_b_unc = ppl_q * log_ppl_q_unc, ppl_b * log_ppl_b_unc
    kld_mean, kld_unc = mean_and_uncertainty(kld)
    dp_mean, dp_unc = mean_and_uncertainty(p_diff)
    mse, mse_unc = mean_and_uncertainty(p_diff * p_diff)
    rms = math.sqrt(mse)
    same = float(np.count_nonzero(same_top)) / n
    return {
        "tokens_scored": n,
        "ppl_q": ppl_q, "ppl_q_stderr": ppl_q_unc,
        "ppl_base": ppl_b, "ppl_base_stderr": ppl_b_unc,
        "cor_ln_ppl": cov / (log_ppl_q_unc * log_ppl_b_unc) if log_ppl_q_unc and log_ppl_b_unc else 0.0,
        "ln_ppl_ratio": ratio_log, "ln_ppl_ratio_stderr": ratio_log_unc,
        "ppl_ratio": math.exp(ratio_log), "ppl_ratio_stderr": math.exp(ratio_log) * ratio_log_unc,
        "ppl_diff": ppl_q - ppl_b,
        "ppl_diff_stderr": math.sqrt(max(0.0, ppl_q_unc**2 + ppl_b_unc**2 - 2 * ppl_q * ppl_b * cov)),
        "kld": kld_mean, "kld_stderr": kld_unc,
        "kld_percentiles": _distribution(kld, KLD_PERCENTILES),
        "delta_p": dp_mean, "delta_p_stderr": dp_unc,
        "delta_p_percentiles": _distribution(p_diff, DP_PERCENTILES),
        "rms_delta_p": rms, "rms_delta_p_stderr": 0.5 / rms * mse_unc if rms > 0 else 0.0,
        "same_top_p": same, "same_top_p_stderr": math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0,
    }
