//! `trainer plan`: the training step `trainer run` would compile for a
//! configuration, before and after the fusion pass: node count, fusion
//! groups, and the memory plan's peak; `--dump` lists the fused schedule.

use super::CliError;
use graft_engine::{CompileOptions, Plan};
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
    let compiled = |fuse| step_plan(&s, tokens, CompileOptions { fuse }).map(|(_, st)| st);
    let (unfused, fused) = (compiled(false)?, compiled(true)?);
    if args.dump {
        print!("{}", fused.plan().dump());
    }
    println!("training step: micro-batch {rows} × {row_len} tokens");
    let line = |what: &str, p: &Plan| {
        println!(
            "  {what:<8} {:>6} nodes, {:>4} fusion groups, peak arena {:>10.1} MiB",
            p.schedule().len(),
            p.fusion().groups,
            p.peak_bytes() as f64 / (1 << 20) as f64
        )
    };
    line("unfused", unfused.plan());
    line("fused", fused.plan());
    Ok(())
}
