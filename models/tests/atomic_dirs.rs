//! Directories written whole or not at all: `write_dir_atomically` (a new
//! or empty directory) and `replace_dir_atomically` (over an old one, which
//! stays whole until the new one is complete).

use graft_models::{replace_dir_atomically, write_dir_atomically, ModelError};
use std::path::{Path, PathBuf};

fn tmp(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("graft-models-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn write(name: &'static str) -> impl FnOnce(&Path) -> Result<(), ModelError> {
    move |d| {
        std::fs::write(d.join(name), name).unwrap();
        Ok(())
    }
}

fn fail(d: &Path) -> Result<(), ModelError> {
    std::fs::write(d.join("half"), "half").unwrap();
    Err(ModelError::Input("the disk is full".into()))
}

#[test]
fn a_new_directory_is_whole_or_absent() {
    let root = tmp("write-dir");
    let dir = root.join("out");
    let e = write_dir_atomically(&dir, fail).unwrap_err();
    assert!(e.to_string().contains("the disk is full"), "{e}");
    assert!(names(&root).is_empty(), "{:?}", names(&root));
    write_dir_atomically(&dir, write("a")).unwrap();
    assert_eq!(names(&dir), ["a"]);
    // A directory that holds files is refused and left as it was.
    let e = write_dir_atomically(&dir, write("b")).unwrap_err();
    assert!(e.to_string().contains("not empty"), "{e}");
    assert_eq!(names(&root), ["out"]);
    assert_eq!(names(&dir), ["a"]);
    std::fs::write(root.join("file"), "x").unwrap();
    let e = write_dir_atomically(&root.join("file"), write("b")).unwrap_err();
    assert!(e.to_string().contains("is a file"), "{e}");
}

#[test]
fn a_replaced_directory_keeps_the_old_one_until_the_new_is_whole() {
    let root = tmp("replace-dir");
    let dir = root.join("model");
    replace_dir_atomically(&dir, write("old")).unwrap();
    // A failed fill leaves the old directory as it was, nothing beside it.
    let e = replace_dir_atomically(&dir, fail).unwrap_err();
    assert!(e.to_string().contains("the disk is full"), "{e}");
    assert_eq!(names(&root), ["model"]);
    assert_eq!(names(&dir), ["old"]);
    // A successful one replaces every file (none of the old is left).
    replace_dir_atomically(&dir, write("new")).unwrap();
    assert_eq!(names(&root), ["model"]);
    assert_eq!(names(&dir), ["new"]);
    assert_eq!(std::fs::read_to_string(dir.join("new")).unwrap(), "new");
}
