//! Choosing the next token: greedy, or temperature with top-k and top-p, from a
//! per-sequence random stream (so a sequence's samples do not depend on what else is
//! generated at the same time).

use kiln_data::SplitMix64;

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0 means greedy (argmax).
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub seed: u64,
}

/// Sampling settings that cannot work: the setting (`temperature`, `top_k`, `top_p`)
/// and what is wrong with its value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field} {message}")]
pub struct SamplingError {
    pub field: &'static str,
    pub message: String,
}

fn bad(field: &'static str, message: String) -> SamplingError {
    SamplingError { field, message }
}

impl Sampling {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }

    pub fn validate(&self) -> Result<(), SamplingError> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(bad(
                "temperature",
                format!("{} must be a finite number >= 0", self.temperature),
            ));
        }
        if self.top_k == Some(0) {
            return Err(bad("top_k", "0: must be at least 1".into()));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(bad("top_p", format!("{p} must be in (0, 1]")));
        }
        Ok(())
    }

    /// Whether every draw is the argmax (no randomness is used).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == Some(1)
    }
}

/// A [`Sampling`] with its own random stream and reused scratch buffers.
#[derive(Debug, Clone)]
pub struct Sampler {
    pub sampling: Sampling,
    rng: SplitMix64,
    order: Vec<u32>,
    probs: Vec<f64>,
}

impl Sampler {
    pub fn new(sampling: Sampling) -> Self {
        let rng = SplitMix64::new(sampling.seed);
        Self {
            sampling,
            rng,
            order: Vec::new(),
            probs: Vec::new(),
        }
    }

    /// Choose a token from `logits` (scaled in place by the temperature).
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        let s = &self.sampling;
        if s.temperature == 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / s.temperature as f32;
        logits.iter_mut().for_each(|l| *l *= inv_t);
        // Candidate ids by logit, descending (ties: lower id first); top-k keeps k.
        let order = &mut self.order;
        order.clear();
        order.extend(0..logits.len() as u32);
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
        if let Some(k) = s.top_k
            && k < order.len()
        {
            order.select_nth_unstable_by(k - 1, by_logit);
            order.truncate(k);
        }
        order.sort_unstable_by(by_logit);
        let max = logits[order[0] as usize];
        let probs = &mut self.probs;
        probs.clear();
        probs.extend(order.iter().map(|&i| ((logits[i as usize] - max) as f64).exp()));
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        // Top-p: the smallest prefix whose probability reaches p.
        if let Some(top_p) = s.top_p {
            let keep = nucleus_len(probs, top_p);
            probs.truncate(keep);
            order.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut r = self.rng.next_f64() * total;
        for (i, p) in probs.iter().enumerate() {
            r -= p;
            if r <= 0.0 {
                return order[i];
            }
        }
        *order.last().expect("at least one candidate")
    }
}

/// How many of `probs` (sorted descending, summing to 1) the top-p nucleus keeps: the
/// smallest prefix whose probability reaches `top_p`.
pub fn nucleus_len(probs: &[f64], top_p: f64) -> usize {
    let mut cumulative = 0.0;
    for (i, p) in probs.iter().enumerate() {
        cumulative += p;
        if cumulative >= top_p {
            return i + 1;
        }
    }
    probs.len()
}

/// Index of the largest value (the first one on ties).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(temperature: f64, top_k: Option<usize>, top_p: Option<f64>, seed: u64) -> Sampling {
        Sampling {
            temperature,
            top_k,
            top_p,
            seed,
        }
    }

    const LOGITS: [f32; 6] = [0.5, 2.0, -1.0, 1.9, 0.0, 2.0];

    #[test]
    fn temperature_zero_is_argmax_and_draws_nothing() {
        let mut s = Sampler::new(Sampling::greedy());
        for _ in 0..3 {
            assert_eq!(s.sample(&mut LOGITS.clone()), 1); // first of the tied maxima
        }
        assert_eq!(argmax(&LOGITS), 1);
    }

    #[test]
    fn top_k_one_is_argmax_at_any_temperature() {
        for seed in 0..20 {
            let mut s = Sampler::new(sampling(1.7, Some(1), None, seed));
            assert_eq!(s.sample(&mut LOGITS.clone()), argmax(&LOGITS));
        }
    }

    #[test]
    fn top_k_only_draws_from_the_k_best() {
        let mut seen = std::collections::BTreeSet::new();
        let mut s = Sampler::new(sampling(5.0, Some(3), None, 7));
        for _ in 0..500 {
            seen.insert(s.sample(&mut LOGITS.clone()));
        }
        assert_eq!(seen, [1, 3, 5].into_iter().collect());
    }

    #[test]
    fn top_p_keeps_the_smallest_prefix_reaching_p() {
        let probs = [0.5, 0.3, 0.15, 0.05];
        assert_eq!(nucleus_len(&probs, 0.5), 1);
        assert_eq!(nucleus_len(&probs, 0.51), 2);
        assert_eq!(nucleus_len(&probs, 0.8), 2);
        assert_eq!(nucleus_len(&probs, 0.81), 3);
        assert_eq!(nucleus_len(&probs, 1.0), 4);
        // Through the sampler: p(1) ~ p(5) ~ 0.37 each at T = 1, so top-p 0.5 keeps
        // exactly those two.
        let mut seen = std::collections::BTreeSet::new();
        let mut s = Sampler::new(sampling(1.0, None, Some(0.5), 3));
        for _ in 0..300 {
            seen.insert(s.sample(&mut LOGITS.clone()));
        }
        assert_eq!(seen, [1, 5].into_iter().collect());
    }

    #[test]
    fn a_fixed_seed_reproduces_and_another_seed_differs() {
        let draw = |seed| {
            let mut s = Sampler::new(sampling(2.0, None, None, seed));
            (0..64).map(|_| s.sample(&mut LOGITS.clone())).collect::<Vec<_>>()
        };
        assert_eq!(draw(11), draw(11));
        assert_ne!(draw(11), draw(12));
    }

    #[test]
    fn samples_follow_the_softmax() {
        // Two tokens, logits ln 3 and 0: p = 0.75 / 0.25.
        let logits = [3f32.ln(), 0.0];
        let mut s = Sampler::new(sampling(1.0, None, None, 5));
        let n = 20_000;
        let zeros = (0..n).filter(|_| s.sample(&mut logits.clone()) == 0).count();
        let p = zeros as f64 / n as f64;
        assert!((p - 0.75).abs() < 0.015, "{p}");
    }

    #[test]
    fn bad_settings_are_named() {
        assert_eq!(
            sampling(-1.0, None, None, 0).validate().unwrap_err().field,
            "temperature"
        );
        assert!(sampling(f64::NAN, None, None, 0).validate().is_err());
        assert_eq!(sampling(1.0, Some(0), None, 0).validate().unwrap_err().field, "top_k");
        let err = sampling(1.0, None, Some(0.0), 0).validate().unwrap_err();
        assert_eq!(err.to_string(), "top_p 0 must be in (0, 1]");
        assert!(sampling(1.0, None, Some(1.5), 0).validate().is_err());
        assert!(sampling(0.7, Some(40), Some(0.95), 0).validate().is_ok());
    }
}
