//! `sqlx::migrate!` embeds the migrations when the crate compiles; cargo does not watch a
//! directory nobody names, so a new migration file would otherwise leave a stale build.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
