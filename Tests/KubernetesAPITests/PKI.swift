import Foundation

/// Test certificates made at test time with the `openssl` CLI: a cluster CA, an API server certificate for
/// 127.0.0.1, ::1, localhost and kubernetes.default.svc, a client certificate signed by the CA, and an
/// unrelated CA (the "wrong CA"). P-256 keys. Made once per test process, in a temporary folder.
struct PKI: Sendable {
    let directory: String
    var caCert: String { "\(directory)/ca.crt" }
    var serverCert: String { "\(directory)/server.crt" }
    var serverKey: String { "\(directory)/server.key" }
    var clientCert: String { "\(directory)/client.crt" }
    var clientKey: String { "\(directory)/client.key" }
    var otherCACert: String { "\(directory)/other-ca.crt" }
    var otherServerCert: String { "\(directory)/other-server.crt" }
    var otherServerKey: String { "\(directory)/other-server.key" }
    /// Valid for kubernetes.default.svc only (no IP address), for tls-server-name.
    var namedServerCert: String { "\(directory)/named-server.crt" }
    var namedServerKey: String { "\(directory)/named-server.key" }

    static let shared: PKI = {
        do { return try generate() } catch { fatalError("cannot make test certificates with openssl: \(error)") }
    }()

    static func generate() throws -> PKI {
        let dir = try TempDir.make(prefix: "k8s-pki")
        let pki = PKI(directory: dir)
        func sh(_ args: [String]) throws {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            p.arguments = ["openssl"] + args
            p.currentDirectoryURL = URL(fileURLWithPath: dir)
            let err = Pipe()
            p.standardError = err
            p.standardOutput = FileHandle.nullDevice
            try p.run()
            let errText = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            p.waitUntilExit()
            try? err.fileHandleForReading.close()
            guard p.terminationStatus == 0 else {
                throw NSError(domain: "openssl", code: Int(p.terminationStatus),
                              userInfo: [NSLocalizedDescriptionKey: "openssl \(args.joined(separator: " ")): \(errText)"])
            }
        }
        func ca(_ name: String, cn: String) throws {
            try sh(["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "\(name).key"])
            try sh(["req", "-x509", "-new", "-key", "\(name).key", "-subj", "/CN=\(cn)", "-days", "2",
                    "-sha256", "-out", "\(name).crt"])
        }
        func leaf(_ name: String, ca: String, subject: String, ext: String) throws {
            try sh(["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "\(name).key"])
            try sh(["req", "-new", "-key", "\(name).key", "-subj", subject, "-out", "\(name).csr"])
            try ext.write(toFile: "\(dir)/\(name).ext", atomically: true, encoding: .utf8)
            try sh(["x509", "-req", "-in", "\(name).csr", "-CA", "\(ca).crt", "-CAkey", "\(ca).key",
                    "-CAcreateserial", "-days", "2", "-sha256", "-extfile", "\(name).ext", "-out", "\(name).crt"])
        }
        let serverExt = """
            basicConstraints=CA:FALSE
            keyUsage=critical,digitalSignature
            extendedKeyUsage=serverAuth
            subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost,DNS:kubernetes.default.svc

            """
        try ca("ca", cn: "hostnet-dnat-test-cluster-ca")
        try leaf("server", ca: "ca", subject: "/CN=kube-apiserver", ext: serverExt)
        try leaf("client", ca: "ca", subject: "/O=system:masters/CN=test-admin", ext: """
            basicConstraints=CA:FALSE
            keyUsage=critical,digitalSignature
            extendedKeyUsage=clientAuth

            """)
        try leaf("named-server", ca: "ca", subject: "/CN=kube-apiserver", ext: """
            basicConstraints=CA:FALSE
            keyUsage=critical,digitalSignature
            extendedKeyUsage=serverAuth
            subjectAltName=DNS:kubernetes.default.svc

            """)
        try ca("other-ca", cn: "some-other-ca")
        try leaf("other-server", ca: "other-ca", subject: "/CN=kube-apiserver", ext: serverExt)
        return pki
    }

    func read(_ path: String) -> String {
        (try? String(contentsOfFile: path, encoding: .utf8)) ?? ""
    }

    func base64(_ path: String) -> String {
        Data(read(path).utf8).base64EncodedString()
    }
}

enum TempDir {
    static func make(prefix: String) throws -> String {
        let path = NSTemporaryDirectory() + "/\(prefix)-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        return (path as NSString).standardizingPath
    }
}
