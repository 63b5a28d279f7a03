//! The anti-corruption layer against a real legacy service, found by name through a
//! real registry (a control plane in this process), and against a fake monolith
//! that answers badly.

use super::*;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use shoal::testing::{self, ControlPlane, DataDir};
use shoal::RunningService;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

/// Wait until `reviews` knows a healthy instance of legacy.
async fn sees_legacy(reviews: &RunningService) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while reviews.ctx().discovery().healthy(LEGACY).is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "reviews never found legacy"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn reviews_of(addr: std::net::SocketAddr, query: &str) -> testing::Answer {
    testing::get(addr, &format!("/api/reviews{query}"))
        .await
        .unwrap()
}

fn review(product_id: &str, rating: u8, text: &str, author: &str) -> Value {
    json!({"product_id": product_id, "rating": rating, "text": text, "author": author})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn translates_the_monoliths_reviews_into_the_shops_language() {
    let plane = ControlPlane::start().await.unwrap();
    let (ldir, rdir) = (
        DataDir::new("shop-reviews-legacy"),
        DataDir::new("shop-reviews"),
    );
    let legacy = plane
        .start_service(shop_legacy::service(), &ldir)
        .await
        .unwrap();
    let reviews = plane.start_service(service(), &rdir).await.unwrap();
    sees_legacy(&reviews).await;
    let addr = reviews.addr();

    let a = reviews_of(addr, "?product_id=p-1").await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(
        a.json(),
        json!([
            review("p-1", 4, "Good grip on wet rock.", "Hiker42"),
            review(
                "p-1",
                5,
                "Ran a marathon in them, no blisters.",
                "Trail Runner"
            ),
        ])
    );
    // Padding trimmed, a reviewer without a name is anonymous.
    assert_eq!(
        reviews_of(addr, "?product_id=p-2").await.json(),
        json!([
            review("p-2", 5, "Warm and they do not itch.", "Mia K."),
            review("p-2", 3, "Thin after one season.", "Anonymous"),
        ])
    );
    // "4.5" rounds up; "N/A", "9" and "0" are not ratings: those reviews are dropped.
    assert_eq!(
        reviews_of(addr, "?product_id=p-3").await.json(),
        json!([review("p-3", 5, "Kept me dry on the ridge.", "Tom")])
    );
    // Products the monolith has no reviews of, and ids it cannot know.
    for q in [
        "?product_id=p-4",
        "?product_id=p-99",
        "?product_id=x-1",
        "?product_id=p-01",
        "?product_id=P1",
    ] {
        let a = reviews_of(addr, q).await;
        assert_eq!(a.status, 200, "{q}: {}", a.text());
        assert_eq!(a.json(), json!([]), "{q}");
    }
    let long = format!("?product_id=p-{}", "1".repeat(100));
    for q in [
        "",
        "?product_id=",
        "?product_id=%20%20",
        "?other=p-1",
        long.as_str(),
    ] {
        let a = reviews_of(addr, q).await;
        assert_eq!(a.status, 400, "{q}: {}", a.text());
        assert_eq!(a.json()["error"]["code"], "validation_failed", "{q}");
    }

    // The monolith goes away: a clear 503, not an empty list.
    legacy.shutdown().await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let a = reviews_of(addr, "?product_id=p-1").await;
        if a.status == 503 {
            assert_eq!(
                a.json()["error"]["code"],
                "legacy_unavailable",
                "{}",
                a.text()
            );
            break;
        }
        assert_eq!(a.status, 200, "{}", a.text());
        assert!(tokio::time::Instant::now() < deadline, "still answering");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    reviews.shutdown().await.unwrap();
    plane.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_monolith_reviews_are_unavailable() {
    let plane = ControlPlane::start().await.unwrap();
    let rdir = DataDir::new("shop-reviews-alone");
    let reviews = plane.start_service(service(), &rdir).await.unwrap();
    let a = reviews_of(reviews.addr(), "?product_id=p-1").await;
    assert_eq!(a.status, 503, "{}", a.text());
    let v = a.json();
    assert_eq!(v["error"]["code"], "legacy_unavailable", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("legacy"));
    // Input is still checked first, and ids with no legacy SKU need no call.
    assert_eq!(reviews_of(reviews.addr(), "").await.status, 400);
    assert_eq!(
        reviews_of(reviews.addr(), "?product_id=sku-1").await.json(),
        json!([])
    );
    reviews.shutdown().await.unwrap();
    plane.stop().await;
}

/// A monolith answering the worst it might: odd values, odd types, too many
/// reviews, HTML, other shapes, errors.
fn bad_legacy() -> Service {
    #[derive(Deserialize)]
    struct Q {
        sku: String,
    }
    async fn get_reviews(axum::extract::Query(q): axum::extract::Query<Q>) -> Response {
        let r = |sku: &str, stars: Value| json!({"SKU": sku, "Stars": stars, "Comment": " c ", "Reviewer": {"DisplayName": "d"}});
        match q.sku.as_str() {
            "P1" => Json(json!({"Count": 11, "ReviewList": [
                r("P1", json!(4)),
                r("P1", json!(" 2.4 ")),
                r("P1", json!(null)),
                r("P1", json!("abc")),
                r("P1", json!("NaN")),
                r("P1", json!("inf")),
                r("P1", json!("-3")),
                r("P1", json!(5.6)),
                r("P2", json!("5")),
                {"SKU": "P1", "Stars": "3"},
                "not a review",
            ]}))
            .into_response(),
            "P2" => (
                [("content-type", "text/html")],
                "<html>Service Temporarily Moved</html>",
            )
                .into_response(),
            "P4" => Json(json!({"Reviews": []})).into_response(),
            "P5" => (
                StatusCode::FORBIDDEN,
                Json(json!({"Fault": {"Code": "Denied"}})),
            )
                .into_response(),
            "P6" => Json(
                json!({"ReviewList": (0..150).map(|_| r("P6", json!("5"))).collect::<Vec<_>>()}),
            )
            .into_response(),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
        }
    }
    Service::new(LEGACY)
        .routes(Router::new().route("/legacy/ReviewService/GetReviews", get(get_reviews)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_legacy_answers_are_dropped_or_refused_never_passed_on() {
    let plane = ControlPlane::start().await.unwrap();
    let (ldir, rdir) = (
        DataDir::new("shop-reviews-bad-legacy"),
        DataDir::new("shop-reviews-bad"),
    );
    let legacy = plane.start_service(bad_legacy(), &ldir).await.unwrap();
    let reviews = plane.start_service(service(), &rdir).await.unwrap();
    sees_legacy(&reviews).await;
    let addr = reviews.addr();

    // Numbers as numbers, rounding, and a review without a reviewer are fine;
    // null, text, NaN, infinity, out of range, another SKU and a non-object are not.
    let a = reviews_of(addr, "?product_id=p-1").await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(
        a.json(),
        json!([
            review("p-1", 4, "c", "d"),
            review("p-1", 2, "c", "d"),
            review("p-1", 3, "", "Anonymous"),
        ])
    );
    let a = reviews_of(addr, "?product_id=p-6").await;
    assert_eq!(a.json().as_array().unwrap().len(), MAX_REVIEWS);
    for q in ["?product_id=p-2", "?product_id=p-4", "?product_id=p-5"] {
        let a = reviews_of(addr, q).await;
        assert_eq!(a.status, 502, "{q}: {}", a.text());
        assert_eq!(a.json()["error"]["code"], "legacy_bad_answer", "{q}");
        assert!(
            !a.text().contains("html"),
            "nothing of the answer leaks: {}",
            a.text()
        );
    }
    let a = reviews_of(addr, "?product_id=p-3").await;
    assert_eq!(a.status, 503, "{}", a.text());
    assert_eq!(a.json()["error"]["code"], "legacy_unavailable");
    legacy.shutdown().await.unwrap();
    reviews.shutdown().await.unwrap();
    plane.stop().await;
}

#[test]
fn ids_translate_both_ways() {
    assert_eq!(sku_for("p-1").as_deref(), Some("P1"));
    assert_eq!(sku_for("p-120").as_deref(), Some("P120"));
    for id in [
        "p-",
        "p-0",
        "p-01",
        "p-1a",
        "P1",
        "x-1",
        "p--1",
        "p-1234567890",
        "",
    ] {
        assert_eq!(sku_for(id), None, "{id}");
    }
    assert_eq!(product_id_for("P1").as_deref(), Some("p-1"));
    assert_eq!(product_id_for(" P7 ").as_deref(), Some("p-7"));
    for sku in ["p1", "P", "P01", "Q1", "P1x"] {
        assert_eq!(product_id_for(sku), None, "{sku}");
    }
}

#[test]
fn ratings_are_whole_stars_from_one_to_five_or_nothing() {
    let cases = [
        (json!("4"), Some(4)),
        (json!(" 3 "), Some(3)),
        (json!("4.5"), Some(5)),
        (json!("4.4"), Some(4)),
        (json!("0.5"), Some(1)),
        (json!("5.4"), Some(5)),
        (json!(2), Some(2)),
        (json!("0"), None),
        (json!("0.4"), None),
        (json!("5.5"), None),
        (json!("9"), None),
        (json!("-1"), None),
        (json!("N/A"), None),
        (json!(""), None),
        (json!("NaN"), None),
        (json!(null), None),
        (json!(true), None),
        (json!(["4"]), None),
    ];
    for (stars, want) in cases {
        assert_eq!(rating(&stars), want, "{stars}");
    }
}
