//! The server's Prometheus metrics: their names in one place, the recorder, and the
//! `/metrics` text.

use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Requests answered, by `endpoint` (the route) and `status` (the HTTP code).
pub const REQUESTS: &str = "kiln_requests_total";
/// Requests refused with 429 because the queue was full.
pub const REJECTED: &str = "kiln_rejected_total";
/// Sequences removed before they finished (the client went away or timed out).
pub const CANCELLED: &str = "kiln_cancelled_total";
/// Sequences waiting for a batch slot.
pub const QUEUE_DEPTH: &str = "kiln_queue_depth";
/// Sequences in the running batch.
pub const RUNNING: &str = "kiln_running_batch_size";
/// Time from a request's arrival to its first generated token.
pub const TTFT: &str = "kiln_time_to_first_token_seconds";
/// Time between consecutive tokens of one sequence.
pub const ITL: &str = "kiln_inter_token_latency_seconds";
/// Time from a request's arrival to its response's end, by `endpoint`.
pub const E2E: &str = "kiln_request_duration_seconds";
pub const PROMPT_TOKENS: &str = "kiln_prompt_tokens_total";
pub const GENERATED_TOKENS: &str = "kiln_generated_tokens_total";
/// Texts embedded or classified, and the batches they ran in.
pub const ENCODED_TEXTS: &str = "kiln_encoded_texts_total";
pub const ENCODER_BATCHES: &str = "kiln_encoder_batches_total";
/// Engine steps (each admits, runs at most one prefill chunk, decodes one token per
/// running sequence).
pub const STEPS: &str = "kiln_engine_steps_total";

/// Histogram buckets for latencies, in seconds (1 ms to 2 min).
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Install the process's recorder; the handle renders `/metrics`. Histograms are kept
/// as Prometheus histograms (buckets above), not summaries, so they aggregate across
/// replicas.
pub fn install() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())?;
    describe();
    // The exporter drains its histograms on upkeep; without it they grow unbounded.
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(Duration::from_secs(5));
                upkeep.run_upkeep();
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(handle)
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(REQUESTS, "Requests answered, by endpoint and HTTP status");
    describe_counter!(REJECTED, "Requests refused with 429 because the queue was full");
    describe_counter!(CANCELLED, "Sequences removed before they finished");
    describe_gauge!(QUEUE_DEPTH, "Sequences waiting for a batch slot");
    describe_gauge!(RUNNING, "Sequences in the running batch");
    describe_histogram!(TTFT, Unit::Seconds, "Arrival to first generated token");
    describe_histogram!(ITL, Unit::Seconds, "Time between consecutive tokens of a sequence");
    describe_histogram!(E2E, Unit::Seconds, "Arrival to the end of the response, by endpoint");
    describe_counter!(PROMPT_TOKENS, "Prompt tokens processed");
    describe_counter!(GENERATED_TOKENS, "Tokens generated");
    describe_counter!(ENCODED_TEXTS, "Texts embedded or classified");
    describe_counter!(ENCODER_BATCHES, "Encoder batches run");
    describe_counter!(STEPS, "Engine steps");
}
