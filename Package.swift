// swift-tools-version:6.0
//
// Data flows one way: KubeObjects (decode) -> ServiceResolution -> RulePlanning -> RuleRendering /
// NetlinkBackend -> NodeBackend -> the `hostnet-dnat` CLI. Only CNetfilter and NetlinkBackend touch C.
import PackageDescription

let package = Package(
    name: "hostnet-dnat",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "hostnet-dnat", targets: ["hostnet-dnat"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/jpsim/Yams", from: "6.0.0"),
        .package(url: "https://github.com/swift-server/async-http-client", from: "1.37.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.0"),
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.0"),
        // Operating `sync`: logs, metrics (Prometheus text through swift-metrics), signals and shutdown.
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
    ],
    targets: [
        // Pure value types: addresses, CIDRs, protocols.
        .target(name: "NetAddress"),
        // Kubernetes documents (JSON / YAML, Lists, multi-document) -> typed Services and EndpointSlices.
        .target(name: "KubeObjects", dependencies: ["NetAddress", .product(name: "Yams", package: "Yams")]),
        // Services + EndpointSlices -> mappings `externalIP:port/proto -> targets`, with skip reasons.
        .target(name: "ServiceResolution", dependencies: ["KubeObjects"]),
        // Mappings -> one deterministic RulePlan (conflicts, families, chain names).
        .target(name: "RulePlanning", dependencies: ["ServiceResolution"]),
        // RulePlan -> nft script, iptables-restore text, JSON. Pure.
        .target(name: "RuleRendering", dependencies: ["RulePlanning"]),
        // The only C: libnftnl + libmnl, with static inline shims for macros.
        .systemLibrary(name: "CNetfilter", pkgConfig: "libnftnl",
                       providers: [.apt(["libnftnl-dev", "libmnl-dev"])]),
        // RulePlan -> one nftables netlink batch; read back; remove.
        .target(name: "NetlinkBackend", dependencies: ["RulePlanning", "CNetfilter"]),
        // Node-side work: namespaces, proxy-mode detection, iptables-restore, apply/diff/remove orchestration.
        .target(name: "NodeBackend", dependencies: ["NetAddress", "ServiceResolution", "RulePlanning", "RuleRendering", "NetlinkBackend"]),
        // Services and EndpointSlices live from the API server (in-cluster or kubeconfig).
        .target(name: "KubernetesAPI", dependencies: [
            "KubeObjects",
            .product(name: "AsyncHTTPClient", package: "async-http-client"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
            .product(name: "Yams", package: "Yams"),
        ]),
        // The pipeline render, apply and sync share: input → store → resolution → plan → diff → kernel, and the
        // agent loop that runs it on every change. Returns values; prints nothing.
        .target(name: "Orchestration", dependencies: [
            "KubeObjects", "ServiceResolution", "RulePlanning", "NetlinkBackend", "NodeBackend", "KubernetesAPI", "AgentOperations",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
        ]),
        // Operating the node agent: Prometheus metrics, /healthz and /readyz over NIO HTTP/1, log handlers.
        .target(name: "AgentOperations", dependencies: [
            "NetAddress", "KubeObjects",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "CoreMetrics", package: "swift-metrics"),
            .product(name: "Prometheus", package: "swift-prometheus"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
        ]),
        .executableTarget(name: "hostnet-dnat", dependencies: [
            "KubeObjects", "ServiceResolution", "RulePlanning", "RuleRendering", "NetlinkBackend", "NodeBackend", "KubernetesAPI",
            "Orchestration", "AgentOperations",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
        ]),

        .target(name: "TestSupport", path: "Tests/TestSupport"),
        .testTarget(name: "NetAddressTests", dependencies: ["NetAddress"]),
        .testTarget(name: "KubeObjectsTests", dependencies: ["KubeObjects"]),
        .testTarget(name: "ServiceResolutionTests", dependencies: ["ServiceResolution"]),
        .testTarget(name: "RulePlanningTests", dependencies: ["RulePlanning"]),
        .testTarget(name: "RuleRenderingTests", dependencies: ["RuleRendering", "KubeObjects", "ServiceResolution"]),
        .testTarget(name: "NetlinkBackendTests", dependencies: ["NetlinkBackend", "RuleRendering", "TestSupport"]),
        .testTarget(name: "NodeBackendTests", dependencies: ["NodeBackend", "NetlinkBackend", "TestSupport", "KubeObjects", "NetAddress",
                                                             "ServiceResolution", "RulePlanning", "RuleRendering"]),
        .testTarget(name: "KubernetesAPITests", dependencies: [
            "KubernetesAPI", "TestSupport", "KubeObjects",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
            .product(name: "Yams", package: "Yams"),
        ]),
        .testTarget(name: "OrchestrationTests", dependencies: ["Orchestration", "TestSupport", "KubeObjects", "NetAddress", "KubernetesAPI",
                                                               "ServiceResolution", "RulePlanning", "NodeBackend", "NetlinkBackend"]),
        .testTarget(name: "HostnetDNATTests", dependencies: ["hostnet-dnat", "TestSupport"]),
        .testTarget(name: "AgentOperationsTests", dependencies: [
            "AgentOperations", "TestSupport",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Prometheus", package: "swift-prometheus"),
        ]),
        // examples/deploy: manifests against the Kubernetes schema, and the image's runtime root (chroot).
        .testTarget(name: "TestSupportTests", dependencies: ["TestSupport"]),
        .testTarget(name: "DeploymentTests", dependencies: ["TestSupport", .product(name: "Yams", package: "Yams")]),
    ]
)
