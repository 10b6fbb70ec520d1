//! Weight bandwidth of the decode kernels: the matrix-vector products of one SmolLM2-135M
//! decode step (30 layers of q, k, v, o, gate, up, down, then the tied head
//! `[49152, 576]`), each matrix its own memory as in the model, with the layer weights
//! in Burn's `[in, out]` layout (`linear_kn`) and in the `[out, in]` layout the inference
//! loader gives them (`linear_nk`), per path and row count. Prints ms per step and GB/s
//! of weight read, best of 8; then the same step with every weight in Q8_0, Q4_0 and
//! Q4_1 blocks (`quant::matvec`, the bytes read counted as packed). The first row is the
//! roofline: the same f32 bytes only summed, over the same thread pool, no product.
//!   RAYON_NUM_THREADS=2 cargo run --release -p kiln-kernels --example matvec_bandwidth [-- WORD...]
//! With words, only the rows whose label (`weights path rows`, e.g. `[out, in] Q4_0 X8
//! Avx2Fma 8`) contains every one of them run (the roofline always does).
use kiln_kernels::quant::{Layout, QuantType, matvec_with, quantize, x8};
use kiln_kernels::{Isa, linear_kn_with, linear_nk_with};
use std::time::Instant;

/// One decode step's products over `layers` then `head` (`[v, c]`, dot-product form), the
/// best of 8 runs in seconds. `product(w, x, y, k, n)` multiplies `m` rows.
fn best_step<W>(
    layers: &[Vec<(usize, usize, W)>],
    head: &W,
    (m, c, v): (usize, usize, usize),
    product: impl Fn(&W, &[f32], &mut [f32], usize, usize, bool),
) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..8 {
        let t = Instant::now();
        for l in layers {
            for (k, n, w) in l {
                let x = vec![0.5f32; m * k];
                let mut y = vec![0f32; m * n];
                product(w, &x, &mut y, *k, *n, false);
            }
        }
        let x = vec![0.5f32; m * c];
        let mut y = vec![0f32; m * v];
        product(head, &x, &mut y, c, v, true);
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

/// The sum of `w`, split over the kernel pool like a product: only the weight's read.
fn pool_sum(w: &[f32]) -> f32 {
    let pool = kiln_kernels::pool::Pool::global();
    let tasks = pool.threads() * 4;
    let chunk = w.len().div_ceil(tasks);
    let total = std::sync::Mutex::new(0f32);
    pool.run(tasks, &|t| {
        let part = &w[(t * chunk).min(w.len())..((t + 1) * chunk).min(w.len())];
        let mut acc = [0f32; 16];
        for c in part.chunks(16) {
            acc.iter_mut().zip(c).for_each(|(a, v)| *a += v);
        }
        *total.lock().unwrap() += acc.iter().sum::<f32>();
    });
    total.into_inner().unwrap()
}

/// The products' arithmetic rate with the weight in cache: `product(x, y)` of `m` rows
/// by one `[n, k]` weight (small enough for the cores' L2), 20 times, best of 100 (short
/// runs, so that some run between a busy machine's preemptions), in GFLOP/s (2 m k n
/// per product).
fn hot(m: usize, k: usize, n: usize, product: impl Fn(&[f32], &mut [f32])) -> f64 {
    let x = vec![0.5f32; m * k];
    let mut y = vec![0f32; m * n];
    let mut best = f64::MAX;
    for _ in 0..100 {
        let t = Instant::now();
        for _ in 0..20 {
            product(&x, &mut y);
        }
        best = best.min(t.elapsed().as_secs_f64() / 20.0);
    }
    2.0 * (m * k * n) as f64 / best / 1e9
}

/// Whether the row labelled `label` was asked for (every word of the command line in it).
fn wanted(label: &str) -> bool {
    std::env::args().skip(1).all(|word| label.contains(&word))
}

fn main() {
    let (c, f, kv, v, layers) = (576, 1536, 192, 49152, 30);
    let layer = [(c, c), (c, kv), (c, kv), (c, c), (c, f), (c, f), (f, c)];
    let fill = |len: usize| (0..len).map(|i| (i % 13) as f32 * 0.01).collect::<Vec<f32>>();
    let weights: Vec<Vec<(usize, usize, Vec<f32>)>> = (0..layers)
        .map(|_| layer.iter().map(|&(k, n)| (k, n, fill(k * n))).collect())
        .collect();
    let head = fill(v * c);
    let bytes = 4 * (layers * layer.iter().map(|(k, n)| k * n).sum::<usize>() + v * c);
    println!(
        "threads {}, {:.0} MB of weights per step",
        kiln_kernels::pool::Pool::global().threads(),
        bytes as f64 / 1e6
    );
    println!("| weights | path | rows | ms/step | GB/s |");
    println!("|---|---|---:|---:|---:|");
    let read = best_step(&weights, &head, (1, c, v), |w, _, y, _, _, _| y[0] = pool_sum(w));
    println!(
        "| f32, read only (roofline) | - | - | {:.2} | {:.1} |",
        read * 1e3,
        bytes as f64 / read / 1e9
    );
    // A [384, 576] weight: 0.9 MB in f32, 0.12 MB in Q4_0, the two cores' L2 holding it.
    let (hk, hn) = (576, 384);
    let hw = fill(hk * hn);
    println!("\nWeight in cache ([{hn}, {hk}]), GFLOP/s:\n");
    println!("| weights | path | rows | GFLOP/s |");
    println!("|---|---|---:|---:|");
    for isa in Isa::available() {
        for m in [1, 8, 16] {
            if wanted(&format!("hot f32 {isa:?} {m}")) {
                let rate = hot(m, hk, hn, |x, y| linear_nk_with(isa, x, &hw, None, y, m, hk, hn));
                println!("| hot f32 | {isa:?} | {m} | {rate:.1} |");
            }
        }
        for ty in [QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1] {
            let mut q = vec![0u8; ty.bytes_for(hk * hn).unwrap()];
            quantize(ty, &hw, &mut q);
            let q = x8::interleave(ty, &q, hn, hk);
            for m in [1, 8, 16] {
                if wanted(&format!("hot {} X8 {isa:?} {m}", ty.name())) {
                    let rate = hot(m, hk, hn, |x, y| {
                        matvec_with(isa, ty, Layout::X8, &q, x, None, y, m, hk, hn)
                    });
                    println!("| hot {} X8 | {isa:?} | {m} | {rate:.1} |", ty.name());
                }
            }
        }
    }
    println!();
    for isa in Isa::available() {
        for kn in [true, false] {
            for m in [1, 8, 16] {
                let layout = if kn { "[in, out]" } else { "[out, in]" };
                if !wanted(&format!("{layout} f32 {isa:?} {m}")) {
                    continue;
                }
                let best = best_step(&weights, &head, (m, c, v), |w, x, y, k, n, is_head| {
                    if kn && !is_head {
                        linear_kn_with(isa, x, w, None, y, m, k, n);
                    } else {
                        linear_nk_with(isa, x, w, None, y, m, k, n);
                    }
                });
                println!(
                    "| {layout} f32 | {isa:?} | {m} | {:.2} | {:.1} |",
                    best * 1e3,
                    bytes as f64 / best / 1e9
                );
            }
        }
    }
    for ty in [QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1] {
        let pack = |k: usize, n: usize, w: &[f32]| {
            let mut q = vec![0u8; ty.bytes_for(k * n).unwrap()];
            quantize(ty, w, &mut q);
            q
        };
        let qweights: Vec<Vec<(usize, usize, Vec<u8>)>> = weights
            .iter()
            .map(|l| l.iter().map(|(k, n, w)| (*k, *n, pack(*k, *n, w))).collect())
            .collect();
        let qhead = pack(c, v, &head);
        let qbytes = qweights.iter().flatten().map(|(_, _, q)| q.len()).sum::<usize>() + qhead.len();
        let xweights: Vec<Vec<(usize, usize, Vec<u8>)>> = qweights
            .iter()
            .map(|l| {
                l.iter()
                    .map(|(k, n, q)| (*k, *n, x8::interleave(ty, q, *n, *k)))
                    .collect()
            })
            .collect();
        let xhead = x8::interleave(ty, &qhead, v, c);
        for isa in Isa::available() {
            for (layout, ws, head) in [(Layout::Rows, &qweights, &qhead), (Layout::X8, &xweights, &xhead)] {
                for m in [1, 8, 16] {
                    if !wanted(&format!("[out, in] {} {layout:?} {isa:?} {m}", ty.name())) {
                        continue;
                    }
                    let best = best_step(ws, head, (m, c, v), |w, x, y, k, n, _| {
                        matvec_with(isa, ty, layout, w, x, None, y, m, k, n)
                    });
                    println!(
                        "| [out, in] {} {layout:?} | {isa:?} | {m} | {:.2} | {:.1} |",
                        ty.name(),
                        best * 1e3,
                        qbytes as f64 / best / 1e9
                    );
                }
            }
        }
    }
}
