/// One storage suite, run against both backends. In a module that defines `Backend` (with
/// `async fn postgres() -> Backend` and `async fn sqlite() -> Backend`) and one
/// `async fn name(b: &Backend)` per test, `conformance!(name, …)` makes `on_postgres::name` and
/// `on_sqlite::name`, each a test of its own on a backend of its own.
#[macro_export]
macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod on_postgres {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(&super::Backend::postgres().await).await;
                }
            )*
        }
        mod on_sqlite {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(&super::Backend::sqlite().await).await;
                }
            )*
        }
    };
}
