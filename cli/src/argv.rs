//! The raw argument list, before clap sees it.

/// `palisadectl --control-plane URL check` (kubectl style, and how scripts
/// written for earlier versions call it): connection and output flags given
/// before the subcommand are moved after it, where they are defined (only
/// commands that talk to the control plane have them, so an offline command
/// still refuses them).
pub(crate) fn hoist_connection_flags(args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut moved = Vec::new();
    let mut i = 1;
    while i < args.len() {
        let a = args[i].to_string_lossy();
        let takes_value = matches!(a.as_ref(), "--control-plane" | "--credentials" | "-o" | "--output");
        let inline = ["--control-plane=", "--credentials=", "--output="].iter().any(|p| a.starts_with(p))
            || (a.starts_with("-o") && a.len() > 2 && !a.starts_with("--"));
        if takes_value && i + 1 < args.len() {
            moved.extend_from_slice(&args[i..i + 2]);
            i += 2;
        } else if inline {
            moved.push(args[i].clone());
            i += 1;
        } else {
            break;
        }
    }
    if moved.is_empty() || i >= args.len() || args[i].to_string_lossy().starts_with('-') {
        return args;
    }
    let mut out = vec![args[0].clone(), args[i].clone()];
    out.extend(moved);
    out.extend_from_slice(&args[i + 1..]);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn connection_flags_before_the_subcommand_are_moved_after_it() {
        let v = |s: &str| s.split(' ').map(std::ffi::OsString::from).collect::<Vec<_>>();
        assert_eq!(
            super::hoist_connection_flags(v("ctl --control-plane X -o json check --wait 1s")),
            v("ctl check --control-plane X -o json --wait 1s")
        );
        assert_eq!(
            super::hoist_connection_flags(v("ctl -ojson --credentials=D proxies")),
            v("ctl proxies -ojson --credentials=D")
        );
        assert_eq!(super::hoist_connection_flags(v("ctl proxies -o json")), v("ctl proxies -o json"));
        assert_eq!(super::hoist_connection_flags(v("ctl --help")), v("ctl --help"));
        assert_eq!(super::hoist_connection_flags(v("ctl -o json")), v("ctl -o json"));
    }
}
