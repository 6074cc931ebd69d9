use super::*;

async fn call(api: &FakeBotApi, method: &str, body: Value) -> (u16, Value) {
    let url = format!("{}bot123:abc/{method}", api.url());
    let resp = reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

#[tokio::test]
async fn get_me_matches_method_names_case_insensitively() {
    let api = FakeBotApi::start().await.unwrap();
    for name in ["getMe", "GetMe", "getme"] {
        let (status, body) = call(&api, name, json!({})).await;
        assert_eq!(status, 200);
        assert_eq!(body["result"]["username"], BOT_USERNAME);
    }
    let calls = api.calls_of("getme");
    assert_eq!(calls.len(), 3);
    assert!(calls.iter().all(|c| c.method == "getMe"));
    let (status, body) = call(&api, "noSuchMethod", json!({})).await;
    assert_eq!(status, 404);
    assert_eq!(body["ok"], false);
}

#[tokio::test]
async fn form_bodies_and_query_strings_are_accepted() {
    let api = FakeBotApi::start().await.unwrap();
    let url = format!("{}bot123:abc/sendMessage?chat_id=5", api.url());
    let resp = reqwest::Client::new()
        .post(url)
        .form(&[("text", "hello there")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["result"]["chat"]["id"], 5);
    let msgs = api.bot_messages(5);
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].text, "hello there");
    assert_eq!(
        api.calls()[0].params,
        json!({"chat_id": 5, "text": "hello there"})
    );
}

#[tokio::test]
async fn get_updates_long_polls_and_confirms_by_offset() {
    let api = Arc::new(FakeBotApi::start().await.unwrap());
    // Nothing pending: a short poll returns empty after its timeout.
    let t = Instant::now();
    let (_, body) = call(&api, "getUpdates", json!({"timeout": 1})).await;
    assert_eq!(body["result"], json!([]));
    assert!(t.elapsed() >= Duration::from_millis(900));

    // A long poll is answered as soon as a message arrives.
    let poller = {
        let api = api.clone();
        tokio::spawn(async move { call(&api, "getUpdates", json!({"timeout": 10})).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = Instant::now();
    api.push_message(7, 70, "/start");
    let (_, body) = poller.await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(5));
    let updates = body["result"].as_array().unwrap().clone();
    assert_eq!(updates.len(), 1);
    assert_eq!(updates[0]["message"]["text"], "/start");
    assert_eq!(updates[0]["message"]["from"]["id"], 7);
    assert_eq!(updates[0]["message"]["entities"][0]["type"], "bot_command");
    let id = updates[0]["update_id"].as_i64().unwrap();

    // Not confirmed yet: delivered again. Confirmed by offset: gone.
    let (_, again) = call(&api, "getUpdates", json!({"offset": id})).await;
    assert_eq!(again["result"].as_array().unwrap().len(), 1);
    let (_, after) = call(&api, "getUpdates", json!({"offset": id + 1})).await;
    assert_eq!(after["result"], json!([]));
}

#[tokio::test]
async fn edits_keep_history_and_identical_edits_are_not_modified() {
    let api = FakeBotApi::start_with(Limits::none()).await.unwrap();
    let (_, sent) = call(&api, "sendMessage", json!({"chat_id": 9, "text": "one"})).await;
    let id = sent["result"]["message_id"].as_i64().unwrap();
    let (s, _) = call(
        &api,
        "editMessageText",
        json!({"chat_id": 9, "message_id": id, "text": "two"}),
    )
    .await;
    assert_eq!(s, 200);
    let (s, body) = call(
        &api,
        "editMessageText",
        json!({"chat_id": 9, "message_id": id, "text": "two"}),
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(body["description"], NOT_MODIFIED);
    let (s, body) = call(
        &api,
        "editMessageText",
        json!({"chat_id": 9, "message_id": 999, "text": "x"}),
    )
    .await;
    assert_eq!(s, 400);
    assert!(body["description"].as_str().unwrap().contains("not found"));
    let m = &api.bot_messages(9)[0];
    assert_eq!(m.history(), vec!["one".to_string(), "two".to_string()]);
    assert!(api.transcript_text(9).contains("~ edit: two"));
}

#[tokio::test]
async fn injected_faults_hit_the_chosen_call_only() {
    let api = FakeBotApi::start().await.unwrap();
    api.fail_call("sendMessage", 2, Fault::RetryAfter(3));
    api.fail_next_call(
        "answerCallbackQuery",
        Fault::BadRequest("query is too old".into()),
    );
    let (s1, _) = call(&api, "sendMessage", json!({"chat_id": 1, "text": "a"})).await;
    let (s2, b2) = call(&api, "sendMessage", json!({"chat_id": 1, "text": "b"})).await;
    let (s3, _) = call(&api, "sendMessage", json!({"chat_id": 1, "text": "c"})).await;
    assert_eq!((s1, s2, s3), (200, 429, 200));
    assert_eq!(b2["parameters"]["retry_after"], 3);
    assert_eq!(b2["error_code"], 429);
    // The failed call sent nothing.
    let texts: Vec<_> = api.bot_messages(1).into_iter().map(|m| m.text).collect();
    assert_eq!(texts, vec!["a", "c"]);
    assert_eq!(
        api.calls_of("sendMessage")[1].fault,
        Some(Fault::RetryAfter(3))
    );
    let (s, b) = call(
        &api,
        "answerCallbackQuery",
        json!({"callback_query_id": "x"}),
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(b["description"], "Bad Request: query is too old");
    let (s, _) = call(
        &api,
        "answerCallbackQuery",
        json!({"callback_query_id": "x"}),
    )
    .await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn a_callback_answer_over_200_characters_is_refused() {
    let api = FakeBotApi::start().await.unwrap();
    let long = "é".repeat(201);
    let (s, b) = call(
        &api,
        "answerCallbackQuery",
        json!({"callback_query_id": "x", "text": long}),
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(b["description"], "Bad Request: MESSAGE_TOO_LONG");
    assert_eq!(
        api.callback_answer("x"),
        None,
        "a refused answer is no answer"
    );
    let fits = "é".repeat(200);
    let (s, _) = call(
        &api,
        "answerCallbackQuery",
        json!({"callback_query_id": "x", "text": fits}),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(api.callback_answer("x"), Some("é".repeat(200)));
}

#[tokio::test]
async fn callbacks_carry_the_message_and_data() {
    let api = FakeBotApi::start().await.unwrap();
    let markup = json!({"inline_keyboard": [[{"text": "Yes", "callback_data": "ok:1"}]]});
    let (_, sent) = call(
        &api,
        "sendMessage",
        json!({"chat_id": 3, "text": "sure?", "reply_markup": markup}),
    )
    .await;
    let id = sent["result"]["message_id"].as_i64().unwrap() as i32;
    assert_eq!(api.bot_messages(3)[0].button_data(), vec!["ok:1"]);
    let cb = api.push_callback(7, 3, id, "ok:1");
    let (_, body) = call(&api, "getUpdates", json!({})).await;
    let q = &body["result"][0]["callback_query"];
    assert_eq!(q["id"], cb);
    assert_eq!(q["data"], "ok:1");
    assert_eq!(q["message"]["message_id"], id);
    assert_eq!(q["from"]["id"], 7);
}

#[tokio::test]
async fn commands_round_trip() {
    let api = FakeBotApi::start().await.unwrap();
    let cmds = json!([{"command": "start", "description": "hi"}]);
    call(&api, "setMyCommands", json!({"commands": cmds})).await;
    assert_eq!(api.commands(), cmds);
    let (_, got) = call(&api, "getMyCommands", json!({})).await;
    assert_eq!(got["result"], cmds);
    let (_, info) = call(&api, "getWebhookInfo", json!({})).await;
    assert_eq!(info["result"]["url"], "");
    let (_, del) = call(&api, "deleteWebhook", json!({})).await;
    assert_eq!(del["result"], true);
}

#[tokio::test]
async fn messages_over_the_chat_rate_get_429_with_retry_after() {
    let api = FakeBotApi::start().await.unwrap();
    // A burst of three passes; the fourth in the same second is refused, edits included.
    let (_, sent) = call(&api, "sendMessage", json!({"chat_id": 1, "text": "a"})).await;
    let id = sent["result"]["message_id"].as_i64().unwrap();
    call(&api, "sendMessage", json!({"chat_id": 1, "text": "b"})).await;
    let (s, _) = call(
        &api,
        "editMessageText",
        json!({"chat_id": 1, "message_id": id, "text": "a2"}),
    )
    .await;
    assert_eq!(s, 200);
    let (s, body) = call(&api, "sendMessage", json!({"chat_id": 1, "text": "c"})).await;
    assert_eq!(s, 429, "{body}");
    assert_eq!(body["parameters"]["retry_after"], 1);
    // Another chat is not affected.
    let (s, _) = call(&api, "sendMessage", json!({"chat_id": 2, "text": "x"})).await;
    assert_eq!(s, 200);
    assert_eq!(api.rate_limited().len(), 1);
    // A second later the chat may receive one more.
    tokio::time::sleep(Duration::from_millis(1010)).await;
    let (s, _) = call(&api, "sendMessage", json!({"chat_id": 1, "text": "c"})).await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn messages_over_the_global_rate_get_429() {
    let api = Arc::new(FakeBotApi::start().await.unwrap());
    // Sixty chats at once: thirty pass (the burst), most of the rest are refused.
    let mut sends = Vec::new();
    for chat in 0..60 {
        let api = api.clone();
        sends.push(tokio::spawn(async move {
            call(&api, "sendMessage", json!({"chat_id": chat, "text": "hi"}))
                .await
                .0
        }));
    }
    let mut refused = 0;
    for s in sends {
        if s.await.unwrap() == 429 {
            refused += 1;
        }
    }
    assert!(refused >= 15, "{refused} refused");
    let unlimited = FakeBotApi::start_with(Limits::none()).await.unwrap();
    for i in 0..40 {
        let (s, _) = call(
            &unlimited,
            "sendMessage",
            json!({"chat_id": 1, "text": i.to_string()}),
        )
        .await;
        assert_eq!(s, 200);
    }
}

#[tokio::test]
async fn callback_data_over_64_bytes_is_refused() {
    let api = FakeBotApi::start().await.unwrap();
    let button = |d: &str| json!({"inline_keyboard": [[{"text": "B", "callback_data": d}]]});
    let (s, _) = call(
        &api,
        "sendMessage",
        json!({"chat_id": 3, "text": "ok", "reply_markup": button(&"x".repeat(64))}),
    )
    .await;
    assert_eq!(s, 200);
    let (s, body) = call(
        &api,
        "sendMessage",
        json!({"chat_id": 4, "text": "no", "reply_markup": button(&"x".repeat(65))}),
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(body["description"], "Bad Request: BUTTON_DATA_INVALID");
    assert!(api.bot_messages(4).is_empty());
}

async fn send_document(api: &FakeBotApi, chat: i64, name: &str, bytes: Vec<u8>) -> (u16, Value) {
    let form = reqwest::multipart::Form::new()
        .text("chat_id", chat.to_string())
        .text("caption", "here it is")
        .part(
            "document",
            reqwest::multipart::Part::bytes(bytes).file_name(name.to_string()),
        );
    let resp = reqwest::Client::new()
        .post(format!("{}bot123:abc/sendDocument", api.url()))
        .multipart(form)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

#[tokio::test]
async fn documents_are_kept_and_over_50_mb_refused() {
    let api = FakeBotApi::start().await.unwrap();
    let (s, body) = send_document(&api, 5, "notes.txt", b"hello".to_vec()).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["result"]["document"]["file_name"], "notes.txt");
    let m = &api.bot_messages(5)[0];
    let doc = m.document.as_ref().unwrap();
    assert_eq!(
        (doc.file_name.as_str(), doc.bytes.as_slice()),
        ("notes.txt", &b"hello"[..])
    );
    assert_eq!(m.text, "here it is");

    let (s, body) = send_document(&api, 6, "big.bin", vec![7u8; MAX_UPLOAD as usize + 1]).await;
    assert_eq!(s, 413);
    assert_eq!(body["description"], "Request Entity Too Large");
    assert!(api.bot_messages(6).is_empty());
}
