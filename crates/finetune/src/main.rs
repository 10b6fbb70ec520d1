//! `finetune`: not implemented yet (tracked by its own issue). It exists so the workspace
//! has its final shape; it exits non-zero with a clear message rather than pretending.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("`finetune` is not implemented yet in this version of Kiln (see its issue); nothing was done")
}
