import Foundation
import KubeObjects
@testable import KubernetesAPI
import Testing

/// Credentials with slips in them, plugins that misbehave, servers that lie.
@Suite struct HostileSurroundingsTests {
    let pki = PKI.shared

    // MARK: credentials

    @Test("a token with a trailing newline is refused before HTTP, naming the field and never the value",
          arguments: ["token: \"\(testToken)\\n\"", "token: \" \(testToken)\"", "password: \"pa55word-secret\\r\\n\"\nusername: admin",
                      "username: \"adm:in\"\npassword: pa55word-secret", "as: \"someone\\u001b[31m\""])
    func inlineCredentialsAreChecked(fields: String) async throws {
        let server = try await TestAPIServer.start(handler: serving(.standard))
        defer { Task { await server.stop() } }
        let ws = try Workspace()
        let config = try ws.write("config", kubeconfig(server: server.url, clusterFields: "certificate-authority: \(pki.caCert)",
                                                       userFields: fields))
        let e = try #require(await loadError(.init(kubeconfig: config), ws.environment()))
        #expect(e.exitCode == 64, "\(e)")
        let field = fields.split(separator: ":").first.map(String.init)!
        #expect(e.description.contains("user \"admin\": \(fields.contains("adm:in") ? "username" : field):"), "\(e)")
        #expect(e.description.contains("the value is not shown") && !e.description.contains("\n"), "\(e)")
        #expect(!e.description.contains(testToken) && !e.description.contains("pa55word"), "\(e)")
        #expect(server.requests.isEmpty)
    }

    @Test("a token file is trimmed as client-go does; a newline inside it is refused without showing it")
    func tokenFileIsTrimmedThenChecked() async throws {
        let server = try await TestAPIServer.start(handler: serving(.standard))
        defer { Task { await server.stop() } }
        let ws = try Workspace()
        let tokenFile = try ws.write("token", "  \(testToken)\n\n")
        let config = try ws.write("config", kubeconfig(server: server.url, clusterFields: "certificate-authority: \(pki.caCert)",
                                                       userFields: "tokenFile: \(tokenFile)"))
        let objects = try await KubernetesSource.load(.init(kubeconfig: config), environment: ws.environment())
        #expect(!objects.services.isEmpty)
        try ws.write("token", "\(testToken)\nsecond-line-of-the-token\n")
        let e = try #require(await loadError(.init(kubeconfig: config), ws.environment()))
        #expect(e.description.contains("token file \(tokenFile)"), "\(e)")
        #expect(e.description.contains("contains a newline"), "\(e)")
        #expect(!e.description.contains(testToken) && !e.description.contains("second-line"), "\(e)")
    }

    @Test("an exec plugin's token with a newline is refused without showing it")
    func execTokenIsChecked() async throws {
        let ws = try Workspace()
        try ws.write("plugin.sh", """
            #!/bin/sh
            printf '%s' '{"kind":"ExecCredential","apiVersion":"client.authentication.k8s.io/v1","status":{"token":"exec-token-abcdef\\n"}}'
            """, executable: true)
        let config = try ws.write("config", kubeconfig(server: "https://127.0.0.1:1", clusterFields: "certificate-authority: \(pki.caCert)",
            userFields: "exec:\n  apiVersion: client.authentication.k8s.io/v1\n  command: ./plugin.sh\n  interactiveMode: Never"))
        let e = try #require(await loadError(.init(kubeconfig: config), ws.environment()))
        #expect(e.exitCode == 77)
        #expect(e.description.contains("returned a status.token that contains a newline at its end"), "\(e)")
        #expect(!e.description.contains("exec-token-abcdef"))
    }

    @Test("redaction catches the forms other layers print a secret in")
    func redactionCatchesEscapedForms() {
        let secret = "tok-\u{1B}[31m-\"quoted\"\n"
        let texts = [
            "header value \(String(reflecting: "Bearer \(secret)")) is invalid",
            "json said \(JSONValue.quoted(secret))",
            "GET /x?token=\(percentEncode(secret))",
            "trimmed: tok-\u{1B}[31m-\"quoted\"",
        ]
        for text in texts {
            let out = Redactor.redact(text, [secret])
            #expect(out.contains("<redacted>"), "\(out.debugDescription)")
            #expect(!out.contains("quoted"), "\(out.debugDescription)")
        }
    }

    // MARK: exec plugins

    func plugin(_ ws: Workspace, _ script: String) throws -> ExecConfig {
        let path = try ws.write("plugin-\(UUID().uuidString).sh", script, executable: true)
        return ExecConfig(apiVersion: "client.authentication.k8s.io/v1", command: path, args: [], env: [],
                          provideClusterInfo: false, interactiveMode: "Never", installHint: nil, origin: "user \"admin\" in test")
    }

    static let credential = #"{"kind":"ExecCredential","apiVersion":"client.authentication.k8s.io/v1","status":{"token":"plugin-token-1"}}"#

    @Test("the plugin starts with no blocked and no ignored signals, whatever our threads block")
    func pluginSignalsAreReset() async throws {
        let ws = try Workspace()
        let config = try plugin(ws, """
            #!/bin/sh
            # Builtins only: the shell blocks signals while it waits for a child, so no child here.
            while read -r key value; do
              case $key in SigBlk:|SigIgn:) echo "$key $value";; esac
            done < /proc/$$/status > "\(ws.path)/signals"
            printf '%s' '\(Self.credential)'
            """)
        let cred = try await ExecPlugin.run(config, cluster: nil, environment: ws.environment(), timeout: .seconds(20))
        #expect(cred.token == "plugin-token-1")
        let signals = try String(contentsOfFile: "\(ws.path)/signals", encoding: .utf8)
        let masks = Dictionary(uniqueKeysWithValues: signals.split(separator: "\n").map {
            let parts = $0.split(separator: " ")
            return (String(parts[0]), UInt64(parts[1], radix: 16) ?? .max)
        })
        #expect(masks["SigBlk:"] == 0, "\(signals)")
        // Signals 1-31 at their defaults; glibc keeps its two internal real-time signals (32, 33) ignored.
        #expect(masks["SigIgn:"].map { $0 & 0x7FFF_FFFF } == 0, "\(signals)")
    }

    @Test("at the deadline the plugin's whole group is stopped, even a grandchild that holds stdout and ignores SIGTERM")
    func pluginDeadlineEndsTheGroup() async throws {
        let ws = try Workspace()
        let config = try plugin(ws, """
            #!/bin/sh
            trap '' TERM
            (trap '' TERM; exec sleep 120) &
            echo $! > "\(ws.path)/grandchild"
            sleep 120
            """)
        do {
            _ = try await ExecPlugin.run(config, cluster: nil, environment: ws.environment(), timeout: .seconds(1))
            Issue.record("a plugin that never finishes was waited for")
        } catch {
            #expect(error.exitCode == 77)
            #expect(error.description.hasSuffix("did not finish within 1s; it was stopped"), "\(error)")
        }
        let pid = try #require(Int32(try String(contentsOfFile: "\(ws.path)/grandchild", encoding: .utf8)
            .trimmingCharacters(in: .whitespacesAndNewlines)))
        // Gone, or a zombie waiting for its new parent to reap it. SIGKILL is delivered asynchronously, so
        // give the kernel a moment to finish it off (a live process stays alive for the whole wait).
        func state() -> Substring? {
            (try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8))?.split(separator: " ").dropFirst(2).first
        }
        for _ in 0..<50 where !(state() == nil || state() == "Z") { try await Task.sleep(for: .milliseconds(100)) }
        #expect(state() == nil || state() == "Z", "grandchild \(pid) is still running: \(state() ?? "")")
    }

    @Test("a plugin that exits but leaves a background helper on stdout is not waited for")
    func pluginExitIsEnoughEvenWithStdoutHeld() async throws {
        let ws = try Workspace()
        let config = try plugin(ws, """
            #!/bin/sh
            sleep 120 &
            echo $! > "\(ws.path)/helper"
            printf '%s' '\(Self.credential)'
            """)
        let cred = try await ExecPlugin.run(config, cluster: nil, environment: ws.environment(), timeout: .seconds(10))
        #expect(cred.token == "plugin-token-1")
        if let pid = Int32(try String(contentsOfFile: "\(ws.path)/helper", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)) {
            kill(pid, SIGKILL)
        }
    }

    @Test("a plugin that floods stdout is stopped at the cap, with the cap in the message")
    func pluginFloodIsCapped() async throws {
        let ws = try Workspace()
        let config = try plugin(ws, "#!/bin/sh\nexec yes credential\n")
        do {
            _ = try await ExecPlugin.run(config, cluster: nil, environment: ws.environment(), timeout: .seconds(60))
            Issue.record("accepted")
        } catch {
            #expect(error.exitCode == 77)
            #expect(error.description.contains("printed more than 4 MiB on stdout"), "\(error)")
        }
    }

    // MARK: the pager

    /// A ServiceList page with `count` services and `next` as its continue token.
    static func servicePage(_ count: Int, next: String?, from start: Int = 0) -> String {
        let items = (0..<count).map { i in
            #"{"metadata":{"name":"s\#(start + i)","namespace":"default"},"spec":{"ports":[{"port":80}]}}"#
        }.joined(separator: ",")
        let cont = next.map { #","continue":"\#($0)""# } ?? ""
        return #"{"kind":"ServiceList","apiVersion":"v1","metadata":{"resourceVersion":"1"\#(cont)},"items":[\#(items)]}"#
    }

    func listError(_ options: KubernetesSourceOptions, handler: @escaping @Sendable (RecordedRequest) -> Reply)
        async throws -> (KubernetesAPIError?, TestAPIServer)
    {
        let server = try await TestAPIServer.start(handler: handler)
        let ws = try Workspace()
        var options = options
        options.kubeconfig = try ws.tokenKubeconfig(server: server.url)
        return (await loadError(options, ws.environment()), server)
    }

    @Test("a server that repeats its continue token is not followed around the loop")
    func repeatedContinueTokenStops() async throws {
        let (e, server) = try await listError(.init()) { _ in .json(200, Self.servicePage(1, next: "same-token")) }
        defer { Task { await server.stop() } }
        let error = try #require(e)
        #expect(error.exitCode == 65)
        #expect(error.description.contains("listing services in all namespaces at https://127.0.0.1:\(server.port)/api/v1/services: the server sent a continue token it had already sent (page 2)"), "\(error)")
        #expect(server.requests.count == 2)
    }

    @Test("pages and items are capped, with the cap in the message")
    func pagesAndItemsAreCapped() async throws {
        // A new token every time and nothing in the pages: only the page cap ends it.
        let (e1, s1) = try await listError(.init(maxPages: 7)) { r in
            .json(200, Self.servicePage(0, next: "t\(r.query["continue"]?.count ?? 0)-\(UUID().uuidString)"))
        }
        defer { Task { await s1.stop() } }
        #expect(e1?.description.contains("the server sent more than 7 pages; stopped (the page limit)") == true, "\(String(describing: e1))")
        #expect(s1.requests.count == 7)

        let (e2, s2) = try await listError(.init(maxItems: 25)) { r in
            let n = Int(r.query["continue"] ?? "0") ?? 0
            return .json(200, Self.servicePage(10, next: String(n + 10), from: n))
        }
        defer { Task { await s2.stop() } }
        #expect(e2?.description.contains("the server sent more than 25 items; stopped (the item limit)") == true, "\(String(describing: e2))")
        #expect(s2.requests.count == 3)
    }

    @Test("a whole list has a deadline, however quickly each page comes")
    func listHasADeadline() async throws {
        let (e, server) = try await listError(.init(listTimeout: .milliseconds(300))) { _ in
            Thread.sleep(forTimeInterval: 0.05)
            return .json(200, Self.servicePage(0, next: UUID().uuidString))
        }
        defer { Task { await server.stop() } }
        let error = try #require(e)
        #expect(error.exitCode == 69)
        #expect(error.description.contains("listing services in all namespaces at https://127.0.0.1:\(server.port)/api/v1/services did not finish within 0.3s"), "\(error)")
    }

    @Test("an empty list from the API is an explicit empty list")
    func apiEmptyListIsExplicit() async throws {
        let server = try await TestAPIServer.start { r in
            r.path.hasSuffix("/services") ? .json(200, Self.servicePage(0, next: nil))
                : .json(200, #"{"kind":"EndpointSliceList","apiVersion":"discovery.k8s.io/v1","metadata":{},"items":[]}"#)
        }
        defer { Task { await server.stop() } }
        let ws = try Workspace()
        let objects = try await KubernetesSource.load(.init(kubeconfig: try ws.tokenKubeconfig(server: server.url)), environment: ws.environment())
        #expect(objects.declaresNoServices)
        #expect(objects.documents == 2)
    }

    @Test("credentials for an http:// server are a warning the CLI can print; https:// and no credential say nothing")
    func plainHTTPWithCredentialsWarns() throws {
        let ws = try Workspace()
        let plain = try ws.write("plain", kubeconfig(server: "http://127.0.0.1:8001", clusterFields: "", userFields: "token: \(testToken)"))
        let warnings = try KubernetesSource.warnings(.init(kubeconfig: plain), environment: ws.environment())
        #expect(warnings.count == 1)
        #expect(warnings.first?.contains("the API server http://127.0.0.1:8001 is plain http://, so kubeconfig user \"admin\" sends its bearer token unencrypted") == true, "\(warnings)")
        #expect(!(warnings.first ?? "").contains(testToken))
        let proxy = try ws.write("proxy", kubeconfig(server: "http://127.0.0.1:8001", clusterFields: "", userFields: "{}"))
        #expect(try KubernetesSource.warnings(.init(kubeconfig: proxy), environment: ws.environment()).isEmpty)
        let tls = try ws.tokenKubeconfig("tls", server: "https://127.0.0.1:6443")
        #expect(try KubernetesSource.warnings(.init(kubeconfig: tls), environment: ws.environment()).isEmpty)
    }

    @Test("files a kubeconfig names are read within a limit: /dev/zero as a CA, key or token file, or as the kubeconfig")
    func configFilesAreBounded() async throws {
        let ws = try Workspace()
        for (fields, what) in [("certificate-authority: /dev/zero", "certificate-authority"), ("tokenFile: /dev/zero", "token file /dev/zero")] {
            let cluster = fields.hasPrefix("certificate") ? fields : "certificate-authority: \(pki.caCert)"
            let user = fields.hasPrefix("token") ? fields : "token: \(testToken)"
            let config = try ws.write("config", kubeconfig(server: "https://127.0.0.1:1", clusterFields: cluster, userFields: user))
            let e = try #require(await loadError(.init(kubeconfig: config), ws.environment()))
            #expect(e.exitCode == 64, "\(e)")
            #expect(e.description.contains(what) && e.description.contains("larger than 16 MiB"), "\(e)")
        }
        let e = try #require(await loadError(.init(kubeconfig: "/dev/zero"), ws.environment()))
        #expect(e.description == "kubeconfig /dev/zero: larger than 16 MiB, which no kubeconfig, certificate or token is", "\(e)")
    }
}
