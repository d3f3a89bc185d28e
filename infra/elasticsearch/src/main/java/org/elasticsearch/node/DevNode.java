package org.elasticsearch.node;

import org.elasticsearch.common.logging.LogConfigurator;
import org.elasticsearch.common.settings.Settings;
import org.elasticsearch.env.Environment;
import org.elasticsearch.plugins.ClasspathPluginsService;
import org.elasticsearch.plugins.Plugin;
import org.elasticsearch.plugins.PluginsLoader;
import org.elasticsearch.plugins.PluginsService;
import org.elasticsearch.transport.netty4.Netty4Plugin;
import orderstream.esdev.RootEndpointPlugin;

import java.io.InputStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import java.util.Collections;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;

/**
 * Starts one Elasticsearch node in this JVM: single-node discovery, HTTP and
 * transport on 127.0.0.1, with the plugins that are on the class path.
 * Usage: DevNode HOME_DIR HTTP_PORT. Stops cleanly on SIGTERM/SIGINT.
 */
public final class DevNode {

    static final List<Class<? extends Plugin>> PLUGINS = List.of(Netty4Plugin.class, RootEndpointPlugin.class);

    public static void main(String[] args) {
        if (args.length != 2) {
            System.err.println("usage: DevNode HOME_DIR HTTP_PORT");
            System.exit(2);
        }
        try {
            run(args);
        } catch (Throwable t) {
            // the node's own threads would keep the JVM alive: exit so the start script sees the failure
            System.err.println("dev-node failed to start: " + t);
            t.printStackTrace();
            Runtime.getRuntime().halt(1);
        }
    }

    private static void run(String[] args) throws Exception {
        Path home = Path.of(args[0]).toAbsolutePath().normalize();
        String httpPort = args[1];
        Files.createDirectories(home.resolve("config"));
        Files.createDirectories(home.resolve("data"));
        Files.createDirectories(home.resolve("logs"));

        Settings settings = Settings.builder()
            .put("path.home", home.toString())
            .put("path.data", home.resolve("data").toString())
            .put("path.logs", home.resolve("logs").toString())
            .put("cluster.name", "orderstream-dev")
            .put("node.name", "dev-node")
            .put("discovery.type", "single-node")
            .put("network.host", "127.0.0.1")
            .put("http.port", httpPort)
            .put("transport.port", "9300-9399")
            // a developer's disk filling up should not flip indices to read-only
            .put("cluster.routing.allocation.disk.threshold_enabled", false)
            .build();

        try (InputStream in = DevNode.class.getResourceAsStream("/dev-node-log4j2.properties")) {
            Files.copy(in, home.resolve("config").resolve("log4j2.properties"), StandardCopyOption.REPLACE_EXISTING);
        }
        Environment environment = InternalSettingsPreparer.prepareEnvironment(settings, Map.of(), home.resolve("config"), () -> "dev-node");
        LogConfigurator.configureESLogging();
        LogConfigurator.setNodeName("dev-node");
        LogConfigurator.configure(environment, true);
        PluginsLoader noBundles = PluginsLoader.createPluginsLoader(Collections.emptySet(), Collections.emptySet(), Collections.emptyMap(), false);
        NodeServiceProvider provider = new NodeServiceProvider() {
            @Override
            PluginsService newPluginService(Environment env, PluginsLoader loader) {
                return new ClasspathPluginsService(env.settings(), env, PLUGINS);
            }
        };
        Node node = new Node(NodeConstruction.prepareConstruction(environment, noBundles, provider, true));

        CountDownLatch stopped = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            try {
                node.close();
                node.awaitClose(30, TimeUnit.SECONDS);
            } catch (Exception e) {
                e.printStackTrace();
            } finally {
                stopped.countDown();
            }
        }, "dev-node-shutdown"));

        node.start();
        System.out.println("dev-node started: http://127.0.0.1:" + httpPort);
        stopped.await();
    }
}
