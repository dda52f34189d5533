//! Unit tests of [`Sampler`]: each sampling knob changes the outcome the way its definition says.

use super::*;

fn params(edit: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
    let mut params = SamplingParams {
        seed: Some(7),
        ..SamplingParams::default()
    };
    edit(&mut params);
    params
}

fn draw_many(params: &SamplingParams, logits: &[f32], draws: usize) -> Vec<u32> {
    let mut sampler = Sampler::new(params);
    (0..draws)
        .map(|_| sampler.sample(logits, &[]).token)
        .collect()
}

fn histogram(tokens: &[u32], vocab: usize) -> Vec<usize> {
    let mut counts = vec![0; vocab];
    for &token in tokens {
        counts[token as usize] += 1;
    }
    counts
}

fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = logits.iter().map(|&l| f64::from(l - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    weights.iter().map(|w| w / total).collect()
}

const SPREAD: [f32; 6] = [1.0, 2.5, 0.3, 2.4, -1.0, 0.0];

#[test]
fn temperature_zero_is_argmax_with_lowest_id_on_ties() {
    let greedy = SamplingParams::greedy();
    assert_eq!(draw_many(&greedy, &SPREAD, 20), vec![1; 20]);
    assert_eq!(draw_many(&greedy, &[0.5, 3.0, 3.0, 1.0], 3), vec![1; 3]);
}

#[test]
fn top_k_one_and_tiny_top_p_are_greedy() {
    for seed in 0..20 {
        let top_k = params(|p| {
            p.seed = Some(seed);
            p.top_k = 1;
        });
        let top_p = params(|p| {
            p.seed = Some(seed);
            p.top_p = 1e-6;
        });
        assert_eq!(draw_many(&top_k, &SPREAD, 10), vec![1; 10]);
        assert_eq!(draw_many(&top_p, &SPREAD, 10), vec![1; 10]);
    }
}

#[test]
fn same_seed_same_tokens_and_different_seeds_differ() {
    let flat = [0.0f32; 50];
    let first = draw_many(&params(|p| p.seed = Some(42)), &flat, 64);
    let again = draw_many(&params(|p| p.seed = Some(42)), &flat, 64);
    let other = draw_many(&params(|p| p.seed = Some(43)), &flat, 64);
    assert_eq!(first, again);
    assert_ne!(first, other);
}

#[test]
fn draws_follow_the_softmax_of_tempered_logits() {
    let draws = 20_000;
    for temperature in [0.5f32, 1.0, 1.7] {
        let tokens = draw_many(&params(|p| p.temperature = temperature), &SPREAD, draws);
        let tempered: Vec<f32> = SPREAD.iter().map(|l| l / temperature).collect();
        let expected = softmax(&tempered);
        for (token, count) in histogram(&tokens, SPREAD.len()).into_iter().enumerate() {
            let observed = count as f64 / draws as f64;
            assert!(
                (observed - expected[token]).abs() < 0.015,
                "T={temperature} token {token}: observed {observed}, expected {}",
                expected[token]
            );
        }
    }
}

#[test]
fn top_k_keeps_only_the_k_most_likely() {
    let tokens = draw_many(&params(|p| p.top_k = 2), &SPREAD, 2_000);
    let counts = histogram(&tokens, SPREAD.len());
    assert!(counts[1] > 0 && counts[3] > 0, "{counts:?}");
    assert_eq!(counts[1] + counts[3], 2_000, "{counts:?}");
}

#[test]
fn top_p_keeps_the_smallest_set_reaching_the_mass() {
    // Probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.75 needs the first two tokens.
    let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
    let counts = histogram(&draw_many(&params(|p| p.top_p = 0.75), &logits, 4_000), 4);
    assert_eq!(counts[2] + counts[3], 0, "{counts:?}");
    let share = counts[0] as f64 / 4_000.0;
    assert!((share - 0.5 / 0.8).abs() < 0.03, "{counts:?}");
}

#[test]
fn top_p_over_a_flat_vocabulary_keeps_exactly_the_nucleus() {
    // 1,000 slowly decreasing logits: the nucleus of 0.5 spans several hundred tokens, more
    // than the first partial-sort round looks at.
    let logits: Vec<f32> = (0..1_000).map(|i| -0.002 * i as f32).collect();
    let probabilities = softmax(&logits);
    let mut cumulative = 0.0;
    let nucleus = 1 + probabilities
        .iter()
        .position(|p| {
            cumulative += p;
            cumulative >= 0.5
        })
        .expect("mass reaches 0.5");
    assert!(nucleus > 256, "{nucleus}");
    let tokens = draw_many(&params(|p| p.top_p = 0.5), &logits, 5_000);
    let highest = tokens.iter().copied().max().expect("draws") as usize;
    assert!(
        highest < nucleus,
        "{highest} outside the nucleus of {nucleus}"
    );
    assert!(
        highest + 20 >= nucleus,
        "{highest}: the nucleus tail is never drawn"
    );
}

#[test]
fn min_p_drops_tokens_below_the_fraction_of_the_best() {
    // p_max = 0.4: min_p 0.5 keeps tokens with p ≥ 0.2.
    let logits: Vec<f32> = [0.4f32, 0.25, 0.19, 0.16].iter().map(|p| p.ln()).collect();
    let counts = histogram(&draw_many(&params(|p| p.min_p = 0.5), &logits, 4_000), 4);
    assert!(counts[0] > 0 && counts[1] > 0, "{counts:?}");
    assert_eq!(counts[2] + counts[3], 0, "{counts:?}");
}

#[test]
fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
    let penalized = SamplingParams {
        repetition_penalty: 2.0,
        logprobs: Some(3),
        ..SamplingParams::greedy()
    };
    // Token 0 (2.0 → 1.0) falls below token 1 (1.5).
    let mut sampler = Sampler::new(&penalized);
    assert_eq!(sampler.sample(&[2.0, 1.5, -1.0], &[0, 0, 2]).token, 1);
    // Token 2 (-1.0 → -2.0): compare with the unpenalized logprob.
    let with = Sampler::new(&penalized).sample(&[2.0, 1.5, -1.0], &[2]);
    let without = Sampler::new(&penalized).sample(&[2.0, 1.5, -1.0], &[]);
    let logprob_of = |sampled: &SampledToken, id| {
        sampled
            .top_logprobs
            .iter()
            .find(|(token, _)| *token == id)
            .map(|&(_, logprob)| logprob)
            .expect("token listed")
    };
    assert!(logprob_of(&with, 2) < logprob_of(&without, 2) - 0.9);
}

#[test]
fn presence_penalty_applies_once_to_generated_tokens() {
    let mut sampler = Sampler::new(&SamplingParams {
        presence_penalty: 0.5,
        ..SamplingParams::greedy()
    });
    let logits = [1.0, 0.9, 0.0];
    let tokens: Vec<u32> = (0..4).map(|_| sampler.sample(&logits, &[]).token).collect();
    // 0 (then 0.5) → 1 (then 0.4) → 0 (still 0.5: presence is not cumulative) → 0.
    assert_eq!(tokens, vec![0, 1, 0, 0]);
}

#[test]
fn frequency_penalty_grows_with_each_occurrence() {
    let mut sampler = Sampler::new(&SamplingParams {
        frequency_penalty: 0.1,
        ..SamplingParams::greedy()
    });
    let logits = [1.0, 0.75];
    let tokens: Vec<u32> = (0..4).map(|_| sampler.sample(&logits, &[]).token).collect();
    assert_eq!(tokens, vec![0, 0, 0, 1]);
}

#[test]
fn logprobs_are_the_log_softmax_of_tempered_logits() {
    let temperature = 0.8;
    let sampled = Sampler::new(&params(|p| {
        p.temperature = temperature;
        p.logprobs = Some(SPREAD.len());
    }))
    .sample(&SPREAD, &[]);
    let tempered: Vec<f32> = SPREAD.iter().map(|l| l / temperature).collect();
    let expected = softmax(&tempered);
    let total: f64 = sampled
        .top_logprobs
        .iter()
        .map(|&(_, logprob)| f64::from(logprob).exp())
        .sum();
    assert!((total - 1.0).abs() < 1e-5, "{total}");
    for &(token, logprob) in &sampled.top_logprobs {
        assert!((f64::from(logprob) - expected[token as usize].ln()).abs() < 1e-5);
    }
    let listed: Vec<u32> = sampled.top_logprobs.iter().map(|&(t, _)| t).collect();
    assert_eq!(listed, vec![1, 3, 0, 2, 5, 4]);
    let chosen = sampled
        .top_logprobs
        .iter()
        .find(|(t, _)| *t == sampled.token);
    assert_eq!(chosen.map(|&(_, lp)| lp), Some(sampled.logprob));
}

#[test]
fn top_logprobs_count_is_honoured_and_absent_when_not_asked() {
    let two = Sampler::new(&params(|p| p.logprobs = Some(2))).sample(&SPREAD, &[]);
    assert_eq!(two.top_logprobs.len(), 2);
    let none = Sampler::new(&params(|_| {})).sample(&SPREAD, &[]);
    assert!(none.top_logprobs.is_empty());
    assert!(none.logprob < 0.0);
}

#[test]
fn nan_logits_are_never_chosen_and_empty_logits_do_not_panic() {
    let logits = [f32::NAN, 0.0, f32::NAN, 0.1];
    for token in draw_many(&params(|_| {}), &logits, 200) {
        assert!(token == 1 || token == 3, "{token}");
    }
    let empty = Sampler::new(&SamplingParams::default()).sample(&[], &[]);
    assert_eq!(empty.logprob, f32::NEG_INFINITY);
}
