//! Path and node-name validation shared by every backend (ZooKeeper's rules, slightly
//! stricter: no control characters, no `.`/`..` components).

use super::{CoordError, Result};

/// Checks one path component (a node name).
pub fn validate_name(name: &str) -> std::result::Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty node name");
    }
    if name == "." || name == ".." {
        return Err("`.` and `..` are not node names");
    }
    if name.contains('/') {
        return Err("node name contains `/`");
    }
    if name.chars().any(|c| c.is_control() || c == '\u{0}') {
        return Err("node name contains a control character");
    }
    if name.len() > 255 {
        return Err("node name longer than 255 bytes");
    }
    Ok(())
}

/// Checks an absolute node path: `/`, or `/a/b` with valid names and no trailing `/`.
pub fn validate_path(path: &str) -> Result<()> {
    let bad = |reason| CoordError::InvalidPath {
        path: path.to_string(),
        reason,
    };
    if path == "/" {
        return Ok(());
    }
    if !path.starts_with('/') {
        return Err(bad("must start with `/`"));
    }
    if path.ends_with('/') {
        return Err(bad("must not end with `/`"));
    }
    for comp in path[1..].split('/') {
        validate_name(comp).map_err(bad)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        for ok in ["/", "/a", "/a/b-c.d:e", "/blocklab/c1/lunmap/luns/l0"] {
            validate_path(ok).unwrap();
        }
        for bad in ["", "a", "/a/", "//", "/a//b", "/a/./b", "/a/../b", "/a\nb"] {
            assert!(validate_path(bad).is_err(), "{bad:?}");
        }
    }
}
