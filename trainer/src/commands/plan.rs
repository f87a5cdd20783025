//! `trainer plan`: the training step `trainer run` would compile for a
//! configuration, without and with the fusion pass and activation
//! recomputation: node count, fusion groups, recomputed blocks and the
//! memory plan's peak, and whether the GPU runs it whole; `--dump` lists
//! the plan the run takes.

use super::CliError;
use graft_engine::Plan;
use graft_trainer::run::session::Session;
use graft_trainer::run::step_plan;

#[derive(clap::Args)]
#[command(after_long_help = graft_trainer::config::DEFAULTS)]
pub struct Args {
    #[command(flatten)]
    config: super::run::ConfigArgs,
    /// Print every node of the fused plan in execution order (fusion groups
    /// are the `matmul_sum[…]` nodes).
    #[arg(long)]
    dump: bool,
}

pub fn run(args: Args) -> Result<(), CliError> {
    let cfg = args.config.load()?;
    let s = Session::open(&cfg, None)?;
    let data = s.prepare(&s.train_path()?)?;
    let (rows, row_len) = (cfg.train.micro_batch_size, s.row_len(&data.docs));
    let tokens = rows * row_len;
    let compiled = |fuse, recompute| step_plan(&s, tokens, fuse, recompute).map(|(_, st)| st);
    let ckpt = cfg.train.gradient_checkpointing;
    if args.dump {
        print!("{}", compiled(true, ckpt)?.plan().dump());
    }
    println!("training step: micro-batch {rows} × {row_len} tokens");
    let line = |what: &str, p: &Plan, taken: bool| {
        println!(
            "  {what:<26} {:>6} nodes, {:>4} fusion groups, {:>4} elementwise chains, {:>3} blocks recomputed, peak arena {:>9.1} MiB{}",
            p.schedule().len(),
            p.fusion().groups,
            p.fusion().chains,
            p.recompute().blocks,
            p.peak_bytes() as f64 / (1 << 20) as f64,
            if taken { "  <- this run" } else { "" }
        )
    };
    for (what, fuse, recompute) in [
        ("unfused", false, false),
        ("fused", true, false),
        ("fused + recomputation", true, true),
    ] {
        line(
            what,
            compiled(fuse, recompute)?.plan(),
            fuse && recompute == ckpt,
        );
    }
    #[cfg(feature = "cuda")]
    {
        let step = compiled(true, ckpt)?;
        match graft_engine::gpu_unsupported(step.plan()).as_slice() {
            [] => println!(
                "  GPU: every node of this run's plan has a kernel; it needs about {:.2} GB of device memory (arena, weights, and the trained tensors' summed gradients and AdamW moments where AdamW runs there; `trainer run` checks it against the GPU's free memory first)",
                graft_engine::device_bytes_needed(step.plan()) as f64 / 1e9
            ),
            missing => {
                println!(
                    "  GPU: {} nodes have no kernel; --device auto runs this plan on the CPU:",
                    missing.len()
                );
                // Each kind of op and reason once, with its count, in plan order.
                let mut kinds: Vec<(&str, &str, usize)> = Vec::new();
                for (n, why) in missing {
                    let op = step.plan().graph().node(*n).op.name();
                    match kinds.iter_mut().find(|k| k.0 == op && k.1 == why) {
                        Some(k) => k.2 += 1,
                        None => kinds.push((op, why, 1)),
                    }
                }
                for (op, why, count) in kinds {
                    println!("    {count:>4} × {op}: {why}");
                }
            }
        }
    }
    Ok(())
}
