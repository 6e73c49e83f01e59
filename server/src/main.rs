//! `portraitd`: starts a Portrait node. Wiring only; see
//! [`portrait_server::daemon`].

fn main() {
    portrait_server::daemon::main()
}
