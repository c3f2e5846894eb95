//! `palisadectl man`: man pages for the command tree.

use anyhow::{Context, Result};
use clap::CommandFactory;
use palisade_cmd::outln;

use crate::Cli;

/// Man pages for the command and each subcommand, named as `man` expects
/// (`palisadectl-policy-apply.1`).
pub(crate) fn write_pages(dir: &std::path::Path) -> Result<()> {
    fn write(cmd: clap::Command, name: String, dir: &std::path::Path, written: &mut Vec<String>) -> Result<()> {
        let cmd = cmd.name(name.clone()).bin_name(name.replace('-', " "));
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
        let file = dir.join(format!("{name}.1"));
        std::fs::write(&file, page).with_context(|| format!("cannot write {}", file.display()))?;
        written.push(file.display().to_string());
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
            write(sub.clone(), format!("{name}-{}", sub.get_name()), dir, written)?;
        }
        Ok(())
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut cmd = Cli::command();
    cmd.build();
    let mut written = Vec::new();
    write(cmd, "palisadectl".into(), dir, &mut written)?;
    for w in written {
        outln!("{w}");
    }
    Ok(())
}
